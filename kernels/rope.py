"""Rotary position embeddings (RoPE) in ggml's two layouts, with ggml's scalings.

- "norm" (llama, mistral): adjacent pairs (x[2i], x[2i+1]) rotate together; the GGUF
  converter permutes Q/K weights so that this layout reproduces HF's rotate-half.
- "neox" (qwen2, gemma3): the halves (x[i], x[i + D/2]) rotate together.

The angle of pair i at position p, as ggml's rope_yarn makes it (ggml-cpu/ops.cpp):
    extrap = p · base^(-2i/D) / ff[i]        ff: per-pair frequency factors (Llama 3.x
                                             `rope_freqs`, LongRoPE's short/long factors)
    interp = extrap / factor                 linear / YaRN / LongRoPE scaling factor
    θ = interp · (1 − r_i) + extrap · r_i    r_i: YaRN's ramp over pairs (0 without YaRN)
and cos θ, sin θ are both multiplied by the magnitude `mscale` (YaRN's and LongRoPE's
attention factor), which scales q·k by mscale². Only the tables change: the rotation kernels
(kernels/small_ops.rope, kernels/triton/rope.py) apply whatever cos/sin they are given.
"""

import math

import torch

from kernels.small_ops import rope


class Rope:
    def __init__(
        self,
        head_dim: int,
        base: float,
        neox: bool,
        scale: float = 1.0,
        *,
        factors: torch.Tensor | None = None,
        yarn: bool = False,
        orig_ctx: int = 0,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        log_mul: float = 0.0,
        attn_factor: float = 1.0,
    ) -> None:
        """scale: the scaling factor (positions interpolate by 1/scale); factors (D/2,): the
        per-pair frequency divisors; yarn: YaRN's ramp and magnitude over orig_ctx, beta_fast
        / beta_slow, log_mul (mscale_all_dims); attn_factor: the magnitude's extra factor."""
        self.half = half = head_dim // 2
        self.neox = neox
        self.scale = scale
        # (D/2,) inverse frequencies of the extrapolated angle
        self.inv_freq = base ** (-torch.arange(0, half, dtype=torch.float64) / half)
        if factors is not None:
            if factors.numel() != half:
                raise ValueError(f"rope frequency factors hold {factors.numel()}, not D/2={half}")
            self.inv_freq = self.inv_freq / factors.to(torch.float64).reshape(half)
        self.ramp = torch.zeros(half, dtype=torch.float64)  # r_i: 1 → extrapolate only
        self.mscale = attn_factor
        if yarn and scale != 1.0:
            low, high = _yarn_corr_dims(head_dim, orig_ctx, base, beta_fast, beta_slow)
            y = (torch.arange(half, dtype=torch.float64) - low) / max(0.001, high - low)
            self.ramp = 1 - y.clamp(0, 1)
            # llama.cpp's attention factor (llama-context.cpp) times rope_yarn's own
            mag = _mscale(scale, 1.0) / _mscale(scale, log_mul) if log_mul else _mscale(scale, 1.0)
            self.mscale = attn_factor * mag

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (T,) → cos, sin: (T, 1, D/2) float32, broadcast over heads
        extrap = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]  # (T, D/2)
        angles = extrap / self.scale * (1 - self.ramp) + extrap * self.ramp
        cos, sin = angles.cos() * self.mscale, angles.sin() * self.mscale
        return cos.float()[:, None, :], sin.float()[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (T, H, D) float32 → (T, H, D)
        return rope(x, cos, sin, self.neox)


def _mscale(scale: float, mscale: float) -> float:
    """YaRN's magnitude for a scaling factor (HF's get_mscale)."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_corr_dims(
    n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float
) -> tuple[float, float]:
    """The pair range over which YaRN ramps from interpolation to extrapolation (ggml's
    ggml_rope_yarn_corr_dims)."""

    def dim(n_rot: float) -> float:
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    return max(0.0, math.floor(dim(beta_fast))), min(n_dims - 1.0, math.ceil(dim(beta_slow)))
