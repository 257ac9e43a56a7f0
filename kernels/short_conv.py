"""The delta net's short causal conv1d and what follows it up to the delta rule (qwen35;
runtime/models/delta_net.py): per channel c of the mix,

    y[t, c] = silu(Σ_{j<K} x[t + j, c] · taps[j, c])     x: the K-1 held mixes, then the n new

then y split into q, k (Hk heads of D) and v (Hv heads), q and k L2-normalised per head
(x / √(Σx² + eps)). One native call (kernels/native/short_conv.cpp) on float32 CPU tensors;
torch's ops otherwise (other devices, TANDEM_NATIVE=0, no build). The taps are summed in
order j = 0 … K-1 both ways (as ggml's ssm_conv)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels import native_loader


def short_conv(
    x: torch.Tensor, taps: torch.Tensor, k_heads: int, v_heads: int, head_dim: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, K-1+n, C), taps (K, C), C = (2·Hk + Hv)·D → q, k (B, n, Hk, D) normalised per
    head, v (B, n, Hv, D)."""
    module = _module() if x.is_cpu and x.dtype == taps.dtype == torch.float32 else None
    if module is not None:
        q, k, v = module.short_conv(
            x.contiguous(), taps.contiguous(), k_heads, v_heads, head_dim, eps
        )
        return q, k, v
    width = taps.shape[0]
    b, n = x.shape[0], x.shape[1] - (width - 1)
    y = x[:, :n] * taps[0]  # (B, n, C)
    for j in range(1, width):
        y = y + x[:, j : j + n] * taps[j]
    y = F.silu(y)
    key = k_heads * head_dim
    q, k, v = y.split([key, key, v_heads * head_dim], dim=-1)
    q, k = (_l2(t.reshape(b, n, k_heads, head_dim), eps) for t in (q, k))
    return q, k, v.reshape(b, n, v_heads, head_dim)


def _l2(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., D) → x / √(Σx² + eps) over D."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


@functools.cache
def _module():
    """The native build, looked up once per process (TANDEM_NATIVE=0: none)."""
    module = native_loader.load() if native_loader.enabled() else None
    return module if module is not None and hasattr(module, "short_conv") else None
