"""act_mul: the gated MLP's act(gate) · up in one pass, float32.

- SiLU: g / (1 + exp(−g)) · up.
- GELU, tanh form: 0.5·g·(1 + tanh(z)) · up with z = √(2/π)·(g + 0.044715·g³). Since
  0.5·(1 + tanh(z)) = 1 / (1 + exp(−2z)), it is computed as g / (1 + exp(−2z)) · up: no tanh
  (which tl lacks), and no overflow trouble: exp → inf gives g / inf = 0, exp → 0 gives g.
This is the exact tanh-form GELU, not gelu_ggml's fp16 table (kernels/small_ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launches pass Python ints/bools to `tl.constexpr` parameters (Triton's convention), which
# pyright reads as instances of the class tl.constexpr: that rule only is off here.
# pyright: reportArgumentType=false

BLOCK = 1024
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # √(2/π)


@triton.jit
def _act_mul_kernel(g_ptr, u_ptr, y_ptr, N, GELU: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat element index, (BLOCK,)
    mask = i < N
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        z = SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        act = g / (1.0 + tl.exp(-2.0 * z))
    else:
        act = g / (1.0 + tl.exp(-g))
    tl.store(y_ptr + i, act * u, mask=mask)


def act_mul(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """gate, up (M, F) (or any shape, the same for both) → silu(gate)·up, or the tanh-form
    gelu(gate)·up when `gelu`, float32 of the same shape."""
    if gate.shape != up.shape:
        raise ValueError(
            f"act_mul wants gate and up of the same shape (M, F); got "
            f"{tuple(gate.shape)}, {tuple(up.shape)}"
        )
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    n = y.numel()
    if n:
        _act_mul_kernel[(triton.cdiv(n, BLOCK),)](g, u, y, n, GELU=bool(gelu), BLOCK=BLOCK)
    return y
