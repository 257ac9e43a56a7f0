"""Fused RMSNorm: y = x / sqrt(mean(x²) + eps) · w, optionally after a residual add, one
pass over each row in float32 (the formula of kernels/norm.py, ggml's).

    rms_norm(x, weight, eps, residual=None)   residual += x in place, then its norm
    add_rms_norm(x, a, weight, eps)           (x + a, its norm), out of place

Both take (..., D) inputs: leading dims are flattened into rows and restored on the way out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launches pass Python ints/bools to `tl.constexpr` parameters (Triton's convention), which
# pyright reads as instances of the class tl.constexpr: that rule only is off here.
# pyright: reportArgumentType=false


@triton.jit
def _rms_kernel(
    x_ptr,
    res_ptr,
    sum_ptr,
    w_ptr,
    y_ptr,
    D,
    eps,
    stride_x,
    stride_r,
    stride_s,
    stride_y,
    HAS_RES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    x = tl.load(x_ptr + row * stride_x + d, mask=mask, other=0.0).to(tl.float32)  # (BD,)
    if HAS_RES:  # x ← x + residual, written out as the new residual stream (sum_ptr)
        x += tl.load(res_ptr + row * stride_r + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_ptr + row * stride_s + d, x, mask=mask)
    scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + d, x * scale * w, mask=mask)


def _check(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(
            f"{name} wants x (..., D), D ≥ 1, and weight (D,); got {tuple(x.shape)}, "
            f"{tuple(weight.shape)}"
        )


def _launch(
    x: torch.Tensor,
    res: torch.Tensor | None,
    out_sum: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """x (M, D) contiguous rows; res, out_sum (M, D) rows contiguous in D, or None → y (M, D)
    float32. With res: out_sum = x + res (out_sum may be res itself) and y is its norm."""
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    has_res = res is not None
    if x.shape[0]:
        res = res if has_res else x
        out_sum = out_sum if out_sum is not None else res
        _rms_kernel[(x.shape[0],)](
            x,
            res,
            out_sum,
            weight.contiguous(),
            y,
            x.shape[1],
            float(eps),
            x.stride(0),
            res.stride(0),
            out_sum.stride(0),
            y.stride(0),
            HAS_RES=has_res,
            BLOCK_D=triton.next_power_of_2(x.shape[1]),
        )
    return y


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., D) → (..., D) float32. With `residual` (..., D) float32, the shape of x:
    residual += x in place first, and the norm is of that sum (the pre-norm block's
    add-then-normalize)."""
    _check("rms_norm", x, weight)
    d = x.shape[-1]
    res = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != torch.float32:
            raise ValueError(
                f"residual must be float32 {tuple(x.shape)}, contiguous in D; "
                f"got {residual.dtype} {tuple(residual.shape)}"
            )
        try:  # rows of the residual itself (a view), so that the add lands in it
            res = residual.view(-1, d)
        except RuntimeError as e:
            raise ValueError(
                "residual's leading dims must flatten to rows without a copy "
                "(e.g. make it contiguous)"
            ) from e
        if res.stride(-1) != 1:
            raise ValueError(f"residual must be float32 {tuple(x.shape)}, contiguous in D")
    y = _launch(x.reshape(-1, d).contiguous(), res, None, weight, eps)
    return y.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, a (..., D), weight (D,) → (s, h) float32 (..., D): s = x + a, h = rms_norm(s)·weight.
    Out of place: x and a are left as they are."""
    _check("add_rms_norm", x, weight)
    if a.shape != x.shape:
        raise ValueError(
            f"add_rms_norm wants x and a of the same shape (..., D); got "
            f"{tuple(x.shape)}, {tuple(a.shape)}"
        )
    d = x.shape[-1]
    x2, a2 = x.reshape(-1, d).contiguous(), a.reshape(-1, d).contiguous()
    s = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
    h = _launch(x2, a2, s, weight, eps)
    return s.view(x.shape), h.view(x.shape)
