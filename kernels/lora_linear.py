"""LoraLinear: a linear layer plus low-rank deltas, applied at run time without merging.

    y = base(x) + Σ scale_i · (x·A_iᵀ)·B_iᵀ        A_i (r, in), B_i (out, r), float32

`base` (a PackedLinear or TritonLinear) is shared, untouched, with every other model on the
same GGUF: each custom model holds only its small A/B pairs, so two adapters on one base
keep one copy of the base weights. The delta costs 2·r·(in + out) flops per token against
the base's in·out. A and B follow x to its device on first use there.
"""

from __future__ import annotations

import torch

from loaders.lora_adapter import LoraWeight


class LoraLinear:
    def __init__(self, base, deltas: list[LoraWeight]) -> None:
        self.base = base
        self.deltas = list(deltas)
        self.in_features, self.out_features = base.in_features, base.out_features
        for d in self.deltas:
            if d.a.shape[1] != self.in_features or d.b.shape[0] != self.out_features:
                raise ValueError(
                    f"LoRA pair A {tuple(d.a.shape)}, B {tuple(d.b.shape)} does "
                    f"not fit a {self.out_features}x{self.in_features} weight"
                )
        self._on: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.rows(ids)

    def _pairs(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        if device not in self._on:
            self._on[device] = [(d.a.to(device), d.b.to(device), d.scale) for d in self.deltas]
        return self._on[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: (M, in) float32 → (M, out) float32
        y = self.base(x)
        for a, b, scale in self._pairs(x.device):
            y = y + scale * ((x @ a.T) @ b.T)  # (M, r) → (M, out)
        return y
