"""TritonLinear: a linear layer over packed GGML rows that runs Triton's kernels on the GPU
(kernels/triton; in Triton's CPU interpreter when there is no CUDA). Same interface as
kernels.linear.PackedLinear: called on (M, K) float32 → (M, N) float32, and `rows(ids)`
for an embedding lookup. Inputs on another device are moved to the weight's device and the
output is returned on the input's device (the crossing of a pinned tensor).

Linears that read the same input (a GPU layer's q, k and v; its gate and up) can share one
device weight, their rows stacked (`TritonLinear.stacked`): each keeps a view of its own
rows, and kernels.linear.matmuls runs the group as one kernel launch over the stack and
splits the output — one launch instead of three (two), with more rows to spread over the
card. The stack is built on the host and uploaded once: no second copy on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.crossing import cross
from quant.dequant import dequantize


@dataclass
class Stack:
    """A group's stacked linear and its members, in order."""

    linear: TritonLinear
    members: list[TritonLinear] = field(default_factory=list)

    @property
    def widths(self) -> list[int]:
        return [m.out_features for m in self.members]


class TritonLinear:
    def __init__(
        self,
        weight: torch.Tensor,
        ggml_type: int,
        in_features: int,
        bias: torch.Tensor | None,
        device: torch.device,
    ) -> None:
        from kernels.triton.qmatmul import qmatmul  # sets up Triton's interpreter without CUDA

        self._qmatmul = qmatmul
        self.weight = weight.to(device)  # (N, row_bytes) uint8, packed, now on the device
        self.ggml_type = ggml_type
        self.in_features = in_features
        self.out_features = weight.shape[0]
        self.bias = bias.to(device) if bias is not None else None
        self.device = device
        self.stack: Stack | None = None  # set on the members of a stacked group

    @classmethod
    def stacked(
        cls,
        weights: list[torch.Tensor],
        ggml_type: int,
        in_features: int,
        biases: list[torch.Tensor | None],
        device: torch.device,
    ) -> list[TritonLinear]:
        """Members over one device weight: weights[i] (N_i, row_bytes) on the host, one
        ggml_type; biases all None or all given. → one TritonLinear per weight, in order."""
        given = [b for b in biases if b is not None]
        if given and len(given) != len(biases):
            raise ValueError("stacked linears' biases must be all None or all given")
        whole = cls(
            torch.cat(weights),
            ggml_type,
            in_features,
            torch.cat(given) if given else None,
            device,
        )
        stack = Stack(whole)
        members, start = [], 0
        for w, _ in zip(weights, biases, strict=True):
            rows = slice(start, start + w.shape[0])
            member = cls(
                whole.weight[rows],
                ggml_type,
                in_features,
                whole.bias[rows] if whole.bias is not None else None,
                device,
            )
            member.stack = stack
            members.append(member)
            start = rows.stop
        stack.members = members
        return members

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids`: (T,) → (T, in_features), on the CPU."""
        return dequantize(self.weight[ids.to(self.device)].cpu(), self.ggml_type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: (M, K) float32 on any device → (M, N) float32 on x's device
        home = x.device
        y = self._qmatmul(
            cross(x, self.device).contiguous(), self.weight, self.ggml_type, self.bias
        )
        return cross(y, home)


def run_stacked(linears: list, x: torch.Tensor) -> list[torch.Tensor] | None:
    """The outputs of `linears` on x by one launch over their stack, when they are exactly
    the members of one stacked group, in order; else None. Each output is a column slice
    (M, N_i) of the stack's (M, ΣN_i) output."""
    first = linears[0]
    stack = first.stack if type(first) is TritonLinear else None
    if (
        stack is None
        or len(linears) != len(stack.members)
        or any(lin is not member for lin, member in zip(linears, stack.members, strict=False))
    ):
        return None
    return list(stack.linear(x).split(stack.widths, dim=1))
