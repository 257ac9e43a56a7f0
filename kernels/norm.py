"""RMSNorm: y = x / sqrt(mean(x²) + eps) · w over the last dimension (kernels/small_ops.py
holds the implementation: native on the CPU, torch elsewhere)."""

from kernels.small_ops import rms_norm

__all__ = ["rms_norm"]
