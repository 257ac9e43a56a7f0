"""The llama family — llama, mistral, qwen2 (q/k/v biases): pre-norm layers of grouped-query
attention with RoPE and a SwiGLU feed-forward.

    h = norm(x);  x += o(attention(rope(q(h)), rope(k(h)), v(h)))
    h = norm(x);  x += down(silu(gate(h)) · up(h))
"""

from __future__ import annotations

import torch

from kernels.linear import matmuls
from runtime.models.base import Layer, Model
from runtime.models.weights import WeightLoader


class Llama(Model):
    architectures = ("llama", "mistral", "qwen2")

    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> Layer:
        q, k, v = w.linears(
            [p + f"attn_{x}.weight" for x in "qkv"], [p + f"attn_{x}.bias" for x in "qkv"]
        )
        gate, up = w.linears([p + "ffn_gate.weight", p + "ffn_up.weight"], [None, None])
        return Layer(
            attn_norm=w.vector(p + "attn_norm.weight", device),
            q=q,
            k=k,
            v=v,
            o=w.linear(p + "attn_output.weight"),
            ffn_norm=w.vector(p + "ffn_norm.weight", device),
            gate=gate,
            up=up,
            down=w.linear(p + "ffn_down.weight"),
            device=device,
        )

    def layer_forward(self, i, b, x, h, rope, tables, window, attend):
        c, n, ops = self.config, x.shape[0], b.ops
        q, k, v = matmuls([b.q, b.k, b.v], h)
        q = q.view(n, c.n_head, c.head_dim)
        k = k.view(n, c.n_head_kv, c.head_dim)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        q, k = ops.rope_qk(q, k, *tables, rope.neox)
        a = b.o(attend(i, q, k, v, window))  # (T, E)
        x, h = ops.add_rms_norm(x, a, b.ffn_norm, c.rms_eps)
        gate, up = matmuls([b.gate, b.up], h)
        return x, b.down(ops.act_mul(gate, up, gelu=False))
