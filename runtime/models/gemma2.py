"""gemma2: gemma3's layer without the QK-norm — pre- and post-norms around attention and
the GELU (tanh) feed-forward, embeddings scaled by √E, a tied head — plus soft-capping:
attention scores become 50·tanh(s / 50) before the softmax (the attention backends do it,
from config.attn_softcap) and the logits 30·tanh(l / 30). Every other layer, from the
first, attends over a sliding window (4096). (llama.cpp: src/models/gemma2.cpp.)

    h = norm(x);  x += norm(o(attention(rope(q(h)), rope(k(h)), v(h))))
    h = norm(x);  x += norm(down(gelu(gate(h)) · up(h)))
    logits = cap · tanh(head(norm(x)) / cap)
"""

from __future__ import annotations

import torch

from runtime.models.gemma3 import Gemma3


class Gemma2(Gemma3):
    architectures = ("gemma2",)
    swa_rope_scaled = True  # llama.cpp's gemma2: the sliding layers' rope scale is the file's

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_softcap
        logits = super().logits(x)
        return cap * torch.tanh(logits / cap) if cap else logits
