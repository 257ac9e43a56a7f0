"""granite: the llama layer with four multipliers (loaders/config.py reads them): token
embeddings × embedding_scale, q·k × attention.scale (instead of 1/√D), each block's output
× residual_scale before its residual add, and logits ÷ logit_scale. RoPE only where
rope.scaling.finetuned (default true). (llama.cpp: src/models/granite.cpp.)

    h = norm(x);  x += r · o(attention(rope(q(h)), rope(k(h)), v(h)))
    h = norm(x);  x += r · down(silu(gate(h)) · up(h))
    logits = head(norm(x)) / logit_scale
"""

from __future__ import annotations

import torch

from runtime.models.llama import Llama


class Granite(Llama):
    architectures = ("granite",)

    def layer_forward(self, i, b, x, h, rope, tables, window, attend):
        c = self.config
        q, k, v = self.qkv(i, b, h, rope, tables)
        a = b.o(attend(i, q, k, v, window)) * c.residual_scale  # (T, E)
        x, h = b.ops.add_rms_norm(x, a, b.ffn_norm, c.rms_eps)
        return x, self.ffn(b, h) * c.residual_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return super().logits(x) / self.config.logit_scale
