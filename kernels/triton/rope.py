"""rope_qk: rotary position embeddings of q and k in one launch, in ggml's two layouts (the
formula of kernels/small_ops.rope).

- "norm" (neox=False): adjacent pairs (x[2i], x[2i+1]) rotate together.
- "neox" (neox=True): the halves (x[i], x[i + D/2]) rotate together.
Pair i of token t turns by the angle whose cos/sin are cos[t, i], sin[t, i]:
(a, b) → (a·cos − b·sin, a·sin + b·cos). The grid is T × (H + Hkv): one program per token and
head, q's heads first, then k's. Inputs are read through their strides; outputs are new.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launches pass Python ints/bools to `tl.constexpr` parameters (Triton's convention), which
# pyright reads as instances of the class tl.constexpr: that rule only is off here.
# pyright: reportArgumentType=false


@triton.jit
def _rotate(src, stride_d, dst, ia, ib, mask, cos, sin):
    """One head: src (D,) at stride_d → dst (D,) contiguous, pairs (ia[i], ib[i])."""
    a = tl.load(src + ia * stride_d, mask=mask, other=0.0).to(tl.float32)  # (BH,)
    b = tl.load(src + ib * stride_d, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + ia, a * cos - b * sin, mask=mask)
    tl.store(dst + ib, a * sin + b * cos, mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    H,
    HALF,
    sq_t,
    sq_h,
    sq_d,
    sk_t,
    sk_h,
    sk_d,
    sqo_t,
    sqo_h,
    sko_t,
    sko_h,
    NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t, h = tl.program_id(0), tl.program_id(1)  # token t; head h of q (h < H) or k (h − H)
    i = tl.arange(0, BLOCK_H)  # pair index, over D/2
    mask = i < HALF
    cos = tl.load(cos_ptr + t * HALF + i, mask=mask, other=0.0)  # (BH,)
    sin = tl.load(sin_ptr + t * HALF + i, mask=mask, other=0.0)
    if NEOX:
        ia, ib = i, i + HALF
    else:
        ia, ib = 2 * i, 2 * i + 1
    if h < H:
        _rotate(
            q_ptr + t * sq_t + h * sq_h,
            sq_d,
            qo_ptr + t * sqo_t + h * sqo_h,
            ia,
            ib,
            mask,
            cos,
            sin,
        )
    else:
        hk = h - H
        _rotate(
            k_ptr + t * sk_t + hk * sk_h,
            sk_d,
            ko_ptr + t * sko_t + hk * sko_h,
            ia,
            ib,
            mask,
            cos,
            sin,
        )


def _table(c: torch.Tensor, n: int, half: int, name: str) -> torch.Tensor:
    """cos or sin (T, 1, D/2) or (T, D/2) → (T, D/2) float32, contiguous."""
    if tuple(c.shape) not in ((n, 1, half), (n, half)):
        raise ValueError(
            f"{name} must be (T, 1, D/2) or (T, D/2) = ({n}, 1, {half}); got {tuple(c.shape)}"
        )
    return c.reshape(n, half).to(torch.float32).contiguous()


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, H, D), k (T, Hkv, D) (any strides), cos/sin (T, 1, D/2) or (T, D/2) → rotated
    (T, H, D), (T, Hkv, D) float32, new contiguous tensors."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"rope_qk wants q (T, H, D) and k (T, Hkv, D) with the same T and "
            f"D; got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    n, n_q, d = q.shape
    n_k = k.shape[1]
    if d % 2:
        raise ValueError(f"rope_qk rotates pairs: head dim D must be even; got {d}")
    half = d // 2
    cos, sin = _table(cos, n, half, "cos"), _table(sin, n, half, "sin")
    qo = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    ko = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    if n and half and n_q + n_k:
        _rope_kernel[(n, n_q + n_k)](
            q,
            k,
            qo,
            ko,
            cos,
            sin,
            n_q,
            half,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            qo.stride(0),
            qo.stride(1),
            ko.stride(0),
            ko.stride(1),
            NEOX=bool(neox),
            BLOCK_H=triton.next_power_of_2(half),
        )
    return qo, ko
