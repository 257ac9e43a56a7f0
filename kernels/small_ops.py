"""The decode step's small ops — RMSNorm, RoPE, residual add + RMSNorm, act(gate)·up — one
native call each (kernels/native/small_ops.cpp) on contiguous float32 CPU tensors, torch's ops
otherwise (other devices, other dtypes, or no native build). Both give the same results to
float32 rounding; the native ones save torch's per-op dispatch and its cache re-warming after
each matmul, which dominate at decode sizes."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels import native_loader


def _native(*tensors: torch.Tensor):
    """The native module when every tensor suits it (CPU, float32), else None."""
    for t in tensors:
        if not t.is_cpu or t.dtype != torch.float32:
            return None
    return _module()


@functools.cache
def _module():
    """The native build, looked up once per process (TANDEM_NATIVE=0: none)."""
    module = native_loader.load() if native_loader.enabled() else None
    return module if module is not None and hasattr(module, "act_mul") else None


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


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope(q) and rope(k) by the same tables, in one native call."""
    module = _native(q, k, cos, sin)
    if module is not None:
        rq, rk = module.rope_qk(q.contiguous(), k.contiguous(), cos, sin, neox)
        return rq, rk
    return rope(q, cos, sin, neox), rope(k, cos, sin, neox)


def add_rms_norm(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, rms_norm(x + a)): a residual add and the norm that follows it, bit for bit the
    two ops apart. x, a: (..., D) float32, weight: (D,)."""
    module = _native(x, a, weight)
    if module is not None:
        s, h = module.add_rms_norm(x.contiguous(), a.contiguous(), weight.contiguous(), eps)
        return s, h
    s = x + a
    return s, rms_norm(s, weight, eps)


def gelu_ggml(x: torch.Tensor) -> torch.Tensor:
    """GELU as llama.cpp's CPU backend computes it: x ≤ -10 → 0, x ≥ 10 → x, otherwise the
    tanh-form GELU of x rounded to fp16, computed in float32 and rounded to fp16 (its lookup
    table over every fp16 value)."""
    v = x.half().float()
    g = 0.5 * v * (1.0 + torch.tanh(0.7978845608028654 * v * (1.0 + 0.044715 * v * v)))
    g = g.half().to(x.dtype)
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, g))


def act_mul(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """silu(gate) · up, or gelu_ggml(gate) · up (gemma's GEGLU, as llama.cpp): (..., F)."""
    module = _native(gate, up)
    if module is not None:
        return module.act_mul(gate.contiguous(), up.contiguous(), gelu)
    return (gelu_ggml(gate) if gelu else F.silu(gate)) * up
