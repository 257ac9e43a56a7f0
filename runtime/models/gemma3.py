"""gemma3: the llama layer plus per-head RMSNorm of q and k, norms after attention and after
the feed-forward, GELU (tanh) gating, embeddings scaled by √E, and sliding-window layers
(five in six) with their own RoPE base; the head is tied to the embeddings. (The scalars —
window, bases, scales — are read in loaders/config.py.)

    h = norm(x);  q, k = qnorm(q(h)), knorm(k(h));  x += norm(o(attention(rope(q), rope(k), v(h))))
    h = norm(x);  x += norm(down(gelu(gate(h)) · up(h)))
"""

from __future__ import annotations

import torch

from runtime.models.base import Layer
from runtime.models.llama import Llama
from runtime.models.weights import WeightLoader


class Gemma3(Llama):
    architectures = ("gemma3",)

    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> Layer:
        layer = super().load_layer(w, i, p, device)
        if self.config.qk_norm:
            layer.q_norm = w.vector(p + "attn_q_norm.weight", device)
            layer.k_norm = w.vector(p + "attn_k_norm.weight", device)
        layer.post_attn_norm = w.vector(p + "post_attention_norm.weight", device)
        layer.post_ffn_norm = w.vector(p + "post_ffw_norm.weight", device)
        return layer

    def layer_forward(self, i, b, x, h, rope, tables, window, attend):
        c, ops = self.config, b.ops
        q, k, v = self.qkv(i, b, h, rope, tables)
        a = ops.rms_norm(b.o(attend(i, q, k, v, window)), b.post_attn_norm, c.rms_eps)
        x, h = ops.add_rms_norm(x, a, b.ffn_norm, c.rms_eps)
        return x, ops.rms_norm(self.ffn(b, h), b.post_ffn_norm, c.rms_eps)
