"""RMSNorm on the CPU: y = x / sqrt(mean(x²) + eps) · w, computed in float32 as ggml does."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., D) float32, weight: (D,) → (..., D)
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * scale * weight
