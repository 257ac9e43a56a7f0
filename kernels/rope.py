"""Rotary position embeddings (RoPE) in ggml's two layouts.

- "norm" (llama, mistral): adjacent pairs (x[2i], x[2i+1]) rotate together; the GGUF
  converter permutes Q/K weights so that this layout reproduces HF's rotate-half.
- "neox" (qwen2, gemma3): the halves (x[i], x[i + D/2]) rotate together.
The angle of pair i at position p is (p / scale) · base^(-2i/D).
"""

import torch

from kernels.small_ops import rope


class Rope:
    def __init__(self, head_dim: int, base: float, neox: bool, scale: float = 1.0) -> None:
        self.half = head_dim // 2
        self.neox = neox
        self.scale = scale
        # (D/2,) inverse frequencies
        self.inv_freq = base ** (-torch.arange(0, self.half, dtype=torch.float64) / self.half)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (T,) → cos, sin: (T, 1, D/2) float32, broadcast over heads
        angles = positions.to(torch.float64)[:, None] / self.scale * self.inv_freq[None, :]
        return angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (T, H, D) float32 → (T, H, D)
        return rope(x, cos, sin, self.neox)
