"""TritonLinear: a linear layer over packed GGML rows that runs Triton's kernels on the GPU
(kernels/triton; in Triton's CPU interpreter when there is no CUDA). Same interface as
kernels.linear.PackedLinear: called on (M, K) float32 → (M, N) float32, and `rows(ids)`
for an embedding lookup. Inputs on another device are moved to the weight's device and the
output is returned on the input's device (the crossing of a pinned tensor).
"""

from __future__ import annotations

import torch

from kernels.crossing import cross
from quant.dequant import dequantize


class TritonLinear:
    def __init__(self, weight: torch.Tensor, ggml_type: int, in_features: int,
                 bias: torch.Tensor | None, device: torch.device) -> None:
        from kernels.triton.qmatmul import qmatmul  # sets up Triton's interpreter without CUDA

        self._qmatmul = qmatmul
        self.weight = weight.to(device)  # (N, row_bytes) uint8, packed, now on the device
        self.ggml_type = ggml_type
        self.in_features = in_features
        self.out_features = weight.shape[0]
        self.bias = bias.to(device) if bias is not None else None
        self.device = device

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids`: (T,) → (T, in_features), on the CPU."""
        return dequantize(self.weight[ids.to(self.device)].cpu(), self.ggml_type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: (M, K) float32 on any device → (M, N) float32 on x's device
        home = x.device
        y = self._qmatmul(cross(x, self.device).contiguous(), self.weight, self.ggml_type,
                          self.bias)
        return cross(y, home)
