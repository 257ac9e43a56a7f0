"""cross: move an activation between the CPU and the GPU at a device boundary of a hybrid
forward (the hidden state between layers on different devices, the input and output of a
CPU-pinned weight inside a GPU layer, a CPU head after GPU layers).

Crossings go through page-locked ("pinned") host memory, which the GPU copies by DMA at the
link's full speed; a copy from ordinary pageable memory is first staged by the driver in
small pieces. Host → device: the CPU tensor is copied into a pinned buffer and sent
non-blocking (torch's caching host allocator keeps that buffer until the copy has run, so
the next crossing never overwrites it early). Device → host: the copy lands in a pinned
tensor and waits for it, since the CPU reads it next. Same device, or no CUDA: unchanged,
or a plain .to().
"""

from __future__ import annotations

import torch


def cross(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on `device` (itself when it is there already)."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        staged.copy_(x)
        return staged.to(device, non_blocking=True)
    if device.type == "cpu" and x.device.type == "cuda":
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        out.copy_(x)  # blocking: the CPU reads it next
        return out
    return x.to(device)
