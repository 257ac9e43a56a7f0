"""qwen35moe (Qwen3.5-35B-A3B and larger): qwen35's layers (runtime/models/qwen35.py: gated
delta nets and gated attention) with a mixture-of-experts feed-forward — routed experts as
qwen3moe's (softmax → top-k → renormalized weights, runtime/models/moe.py) plus a shared
expert whose SwiGLU output is scaled per token by a sigmoid gate. (llama.cpp:
src/models/qwen35moe.cpp.)

    h = post_attention_norm(x)
    x += Σ_k w_k · down_k(silu(gate_k(h)) · up_k(h)) + σ(h · g) · down_s(silu(gate_s(h)) · up_s(h))
"""

from __future__ import annotations

import torch

from runtime.models.base import Layer
from runtime.models.moe import MoE
from runtime.models.qwen35 import Qwen35, Qwen35Layer
from runtime.models.weights import WeightLoader


class Qwen35Moe(Qwen35):
    architectures = ("qwen35moe",)

    def load_gate_up(self, w: WeightLoader, p: str) -> list:
        """The shared expert's gate and up (the layer's dense gate/up/down are its)."""
        return w.linears([p + "ffn_gate_shexp.weight", p + "ffn_up_shexp.weight"], [None, None])

    def load_down(self, w: WeightLoader, p: str):
        return w.linear(p + "ffn_down_shexp.weight")

    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> Layer:
        layer = super().load_layer(w, i, p, device)
        assert isinstance(layer, Qwen35Layer)
        layer.moe = MoE.load(w, p)
        layer.shared_gate = w.vector(p + "ffn_gate_inp_shexp.weight", device)
        return layer

    def ffn(self, b: Layer, h: torch.Tensor) -> torch.Tensor:
        """h (T, E) → the routed experts' sum plus the gated shared expert (T, E)."""
        assert isinstance(b, Qwen35Layer) and b.moe is not None and b.shared_gate is not None
        shared = super().ffn(b, h) * torch.sigmoid(h @ b.shared_gate)[:, None]
        return b.moe(h, b.ops) + shared
