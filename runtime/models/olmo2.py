"""olmo2: no norm before attention or the feed-forward; instead RMSNorm of q and of k over
all their heads at once (weights of n_head·D and n_head_kv·D), before RoPE (NEOX), and
norms after attention and after the feed-forward. (llama.cpp: src/models/olmo2.cpp.)

    q, k = qnorm(q(x)), knorm(k(x));  x += norm(o(attention(rope(q), rope(k), v(x))))
    x += norm(down(silu(gate(x)) · up(x)))
"""

from __future__ import annotations

import torch

from kernels.linear import matmuls
from runtime.models.base import Layer
from runtime.models.llama import Llama
from runtime.models.weights import WeightLoader


class Olmo2(Llama):
    architectures = ("olmo2",)

    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> Layer:
        layer = super().load_layer(w, i, p, device)  # without attn_norm / ffn_norm
        layer.q_norm = w.vector(p + "attn_q_norm.weight", device)  # (H·D,)
        layer.k_norm = w.vector(p + "attn_k_norm.weight", device)  # (Hkv·D,)
        layer.post_attn_norm = w.vector(p + "post_attention_norm.weight", device)
        layer.post_ffn_norm = w.vector(p + "post_ffw_norm.weight", device)
        return layer

    def layer_forward(self, i, b, x, h, rope, tables, window, attend):
        c, n, ops = self.config, x.shape[0], b.ops
        q, k, v = matmuls([b.q, b.k, b.v], x)  # (T, H·D), (T, Hkv·D), (T, Hkv·Dv)
        q = ops.rms_norm(q, b.q_norm, c.rms_eps).view(n, c.n_head, c.head_dim)
        k = ops.rms_norm(k, b.k_norm, c.rms_eps).view(n, c.n_head_kv, c.head_dim)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        q, k = ops.rope_qk(q, k, *tables, rope.neox)
        a = ops.rms_norm(b.o(attend(i, q, k, v, window)), b.post_attn_norm, c.rms_eps)
        x = x + a
        return x, ops.rms_norm(self.ffn(b, x), b.post_ffn_norm, c.rms_eps)
