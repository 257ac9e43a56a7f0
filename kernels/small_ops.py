"""The decode step's small ops — RMSNorm, RoPE — one native call each
(kernels/native/small_ops.cpp) on contiguous float32 CPU tensors, torch's ops otherwise
(other devices, other dtypes, or no native build). Both give the same results to float32
rounding; the native ones save torch's per-op dispatch, which dominates at decode sizes."""

from __future__ import annotations

import functools

import torch

from kernels import native_loader


def _native(*tensors: torch.Tensor):
    """The native module when every tensor suits it (CPU, float32), else None."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return None
    return _module()


@functools.cache
def _module():
    """The native build, looked up once per process (TANDEM_NATIVE=0: none)."""
    module = native_loader.load() if native_loader.enabled() else None
    return module if module is not None and hasattr(module, "rms_norm") else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., D) float32, weight: (D,) → (..., D)
    module = _native(x, weight)
    if module is not None:
        return module.rms_norm(x.contiguous(), weight.contiguous(), eps)
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * scale * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    # x: (T, H, D) float32, cos/sin: (T, 1, D/2) → (T, H, D)
    module = _native(x, cos, sin)
    if module is not None:
        return module.rope(x.contiguous(), cos, sin, neox)
    half = x.shape[-1] // 2
    if neox:
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    pairs = x.unflatten(-1, (half, 2))  # (T, H, D/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
