"""qwen3: the llama layer with RMSNorm of each head of q and of k (their own weights, over
the head size) before RoPE, NEOX rope, no q/k/v biases. (llama.cpp: src/models/qwen3.cpp.)

    h = norm(x);  q, k = qnorm(q(h)), knorm(k(h));  x += o(attention(rope(q), rope(k), v(h)))
    h = norm(x);  x += down(silu(gate(h)) · up(h))
"""

from __future__ import annotations

import torch

from runtime.models.base import Layer
from runtime.models.llama import Llama
from runtime.models.weights import WeightLoader


class Qwen3(Llama):
    architectures = ("qwen3",)

    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> Layer:
        layer = super().load_layer(w, i, p, device)
        layer.q_norm = w.vector(p + "attn_q_norm.weight", device)
        layer.k_norm = w.vector(p + "attn_k_norm.weight", device)
        return layer
