"""Fused RMSNorm: y = x / sqrt(mean(x²) + eps) · w, optionally after a residual add, one
pass over each row in float32 (the formula of kernels/norm.py, ggml's)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_kernel(x_ptr, res_ptr, w_ptr, y_ptr, D, eps, stride_x, stride_r, stride_y,
                HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    x = tl.load(x_ptr + row * stride_x + d, mask=mask, other=0.0).to(tl.float32)  # (BD,)
    if HAS_RES:  # x ← x + residual, written back as the new residual stream
        x += tl.load(res_ptr + row * stride_r + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_ptr + row * stride_r + d, x, mask=mask)
    scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + d, x * scale * w, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, D) → (M, D) float32. With `residual` (M, D) float32: residual += x in place
    first, and the norm is of that sum (the pre-norm block's add-then-normalize)."""
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm wants x (M, D) and weight (D,); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != torch.float32
                                 or residual.stride(-1) != 1):
        raise ValueError(f"residual must be float32 {tuple(x.shape)}, contiguous in D")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.shape[0]:
        res = residual if residual is not None else x
        _rms_kernel[(x.shape[0],)](x, res, weight, y, x.shape[1], float(eps), x.stride(0),
                                   res.stride(0), y.stride(0), HAS_RES=residual is not None,
                                   BLOCK_D=triton.next_power_of_2(x.shape[1]))
    return y
