"""KVCache: one sequence's keys and values, a contiguous slab per layer (CPU).

Slabs are allocated with torch.empty, so memory is committed only as positions are written.
"""

from __future__ import annotations

import torch

from loaders.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, n_ctx: int, dtype: torch.dtype = torch.float16):
        self.n_ctx = n_ctx
        self.dtype = dtype
        shape_k = (n_ctx, config.n_head_kv, config.head_dim)
        shape_v = (n_ctx, config.n_head_kv, config.head_dim_v)
        self.k = [torch.empty(shape_k, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape_v, dtype=dtype) for _ in range(config.n_layer)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k: (T, Hkv, D), v: (T, Hkv, Dv) stored at positions start … start+T-1
        end = start + k.shape[0]
        self.k[layer][start:end] = k
        self.v[layer][start:end] = v

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0 … end-1: (end, Hkv, D), (end, Hkv, Dv)."""
        return self.k[layer][:end].float(), self.v[layer][:end].float()
