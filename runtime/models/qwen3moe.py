"""qwen3moe (Qwen3-30B-A3B, 235B-A22B): the llama layer with per-head RMSNorm of q and k
(before RoPE, NEOX) and a mixture-of-experts feed-forward routed softmax → top-k → weights
renormalized to sum to 1 (runtime/models/moe.py); no shared expert, no biases.

    h = norm(x);  q, k = qnorm(q(h)), knorm(k(h));  x += o(attention(rope(q), rope(k), v(h)))
    h = norm(x);  x += Σ_k w_k · down_k(silu(gate_k(h)) · up_k(h))
"""

from __future__ import annotations

import torch

from kernels.linear import matmuls
from runtime.models.base import Model
from runtime.models.moe import MoE, MoELayer
from runtime.models.weights import WeightLoader


class Qwen3Moe(Model):
    architectures = ("qwen3moe",)

    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> MoELayer:
        q, k, v = w.linears([p + f"attn_{x}.weight" for x in "qkv"], [None, None, None])
        return MoELayer(
            attn_norm=w.vector(p + "attn_norm.weight", device),
            q=q,
            k=k,
            v=v,
            o=w.linear(p + "attn_output.weight"),
            ffn_norm=w.vector(p + "ffn_norm.weight", device),
            q_norm=w.vector(p + "attn_q_norm.weight", device),
            k_norm=w.vector(p + "attn_k_norm.weight", device),
            moe=MoE.load(w, p),
            device=device,
        )

    def layer_forward(self, i, b, x, h, rope, tables, window, attend):
        c, n, ops = self.config, x.shape[0], b.ops
        q, k, v = matmuls([b.q, b.k, b.v], h)
        q = ops.rms_norm(q.view(n, c.n_head, c.head_dim), b.q_norm, c.rms_eps)
        k = ops.rms_norm(k.view(n, c.n_head_kv, c.head_dim), b.k_norm, c.rms_eps)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        q, k = ops.rope_qk(q, k, *tables, rope.neox)
        x, h = ops.add_rms_norm(x, b.o(attend(i, q, k, v, window)), b.ffn_norm, c.rms_eps)
        assert isinstance(b, MoELayer) and b.moe is not None  # load_layer made it
        return x, b.moe(h, ops)
