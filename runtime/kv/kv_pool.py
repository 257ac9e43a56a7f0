"""KVPool: the paged key/value pages of one device's layers.

Per layer, keys and values are one slab of num_blocks × BLOCK_SIZE token slots; slot
`block * BLOCK_SIZE + offset` holds one position of one sequence (BlockManager decides which).
Two storage types (`kv_cache_type`):

- "f16": float16 rows, (slots, Hkv, D).
- "q8_0": ggml's Q8_0 per 32 values of a head row: int8 values (slots, Hkv, D) and one float16
  scale per 32 (slots, Hkv, D/32): 34 bytes per 32 values instead of 64 (47% less).

Each layer's slabs live on that layer's device (a hybrid model keeps its GPU layers' pages
in VRAM); a block id names the same slots in every layer, so one block table serves all.
Slabs come from torch.empty, so memory is committed only as slots are first written.
"""

from __future__ import annotations

import torch

from kernels.attention import kv_write_f16
from loaders.config import ModelConfig
from quant.errors import InvalidParameterError

KV_CACHE_TYPES = ("f16", "q8_0")
QBLOCK = 32

BLOCK_SIZE = 16  # token positions per KV block (page); one block id names a page in every layer


def kv_bytes_per_token(config: ModelConfig, kv_cache_type: str) -> int:
    """Bytes one token position takes in every attention layer, keys and values together (a
    recurrent layer, qwen35's delta nets, keeps per-sequence state instead: no KV)."""
    per_layer = config.n_head_kv * (config.head_dim + config.head_dim_v)
    layers = config.n_layer - sum(config.recurrent_layers)
    if kv_cache_type == "q8_0":
        return layers * per_layer * 34 // QBLOCK
    return layers * per_layer * 2


class _Slab:
    """One layer's keys or values: (slots, H, D) in f16, or int8 values + f16 scales."""

    def __init__(
        self, slots: int, heads: int, dim: int, quantized: bool, device: torch.device
    ) -> None:
        self.quantized = quantized
        if quantized:
            self.q = torch.empty(slots, heads, dim, dtype=torch.int8, device=device)
            self.scale = torch.empty(
                slots, heads, dim // QBLOCK, dtype=torch.float16, device=device
            )
        else:
            self.data = torch.empty(slots, heads, dim, dtype=torch.float16, device=device)

    def pages(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slab as (num_blocks, BLOCK_SIZE, H, D) pages (the GPU kernels' layout): f16
        values and None, or q8_0's int8 values and float16 scales (…, D/32)."""

        def paged(t: torch.Tensor) -> torch.Tensor:
            return t.view(-1, BLOCK_SIZE, *t.shape[1:])

        if self.quantized:
            return paged(self.q), paged(self.scale)
        return paged(self.data), None

    @property
    def nbytes(self) -> int:
        parts = (self.q, self.scale) if self.quantized else (self.data,)
        return sum(t.numel() * t.element_size() for t in parts)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        # slots: (T,) int64, x: (T, H, D) float32
        if not self.quantized:
            self.data[slots] = x.to(torch.float16)
            return
        blocks = x.unflatten(-1, (-1, QBLOCK))  # (T, H, D/32, 32)
        d = blocks.abs().amax(-1) / 127.0  # (T, H, D/32)
        d16 = d.to(torch.float16)
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        self.q[slots] = torch.round(blocks * inv[..., None]).to(torch.int8).flatten(-2)
        self.scale[slots] = d16

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        # slots: (L,) → (L, H, D) float32
        if not self.quantized:
            return self.data[slots].float()
        q = self.q[slots].unflatten(-1, (-1, QBLOCK)).float()  # (L, H, D/32, 32)
        return (q * self.scale[slots].float()[..., None]).flatten(-2)

    def copy_block(self, src: int, dst: int) -> None:
        s, d = (
            slice(src * BLOCK_SIZE, (src + 1) * BLOCK_SIZE),
            slice(dst * BLOCK_SIZE, (dst + 1) * BLOCK_SIZE),
        )
        for t in (self.q, self.scale) if self.quantized else (self.data,):
            t[d] = t[s]


class KVPool:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        kv_cache_type: str = "f16",
        devices: list[torch.device] | None = None,
    ) -> None:
        """devices: per layer, where its pages live (default: all on the CPU)."""
        if kv_cache_type not in KV_CACHE_TYPES:
            raise InvalidParameterError(
                f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache_type!r}"
            )
        quantized = kv_cache_type == "q8_0"
        if quantized and (config.head_dim % QBLOCK or config.head_dim_v % QBLOCK):
            raise InvalidParameterError(
                f"kv_cache_type q8_0 needs head sizes divisible by {QBLOCK}; this model has "
                f"{config.head_dim}/{config.head_dim_v}: use f16"
            )
        self.kv_cache_type = kv_cache_type
        self.num_blocks = num_blocks
        self.devices = devices or [torch.device("cpu")] * config.n_layer
        self.layers = range(config.n_layer)
        slots, h = num_blocks * BLOCK_SIZE, config.n_head_kv
        recurrent = config.recurrent_layers or (False,) * config.n_layer
        # (slots of each layer: none in a recurrent layer, which never attends)
        sizes = [0 if r else slots for r in recurrent]
        self.k = [
            _Slab(n, h, config.head_dim, quantized, d)
            for n, d in zip(sizes, self.devices, strict=True)
        ]
        self.v = [
            _Slab(n, h, config.head_dim_v, quantized, d)
            for n, d in zip(sizes, self.devices, strict=True)
        ]

    @property
    def nbytes(self) -> int:
        """Bytes the pool spans (committed as slots are written)."""
        return sum(s.nbytes for s in (*self.k, *self.v))

    def nbytes_on(self, device: torch.device) -> int:
        return sum(
            k.nbytes + v.nbytes
            for k, v, d in zip(self.k, self.v, self.devices, strict=True)
            if d == device
        )

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: (T,) int64; k: (T, Hkv, D), v: (T, Hkv, Dv) float32
        keys, values = self.k[layer], self.v[layer]
        if not keys.quantized and kv_write_f16(k, v, keys.data, values.data, slots):
            return  # both in one native call
        keys.write(slots, k)
        values.write(slots, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots` (L,), in position order: (L, Hkv, D), (L, Hkv, Dv)."""
        return self.k[layer].read(slots), self.v[layer].read(slots)

    def pages(
        self, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A layer's keys and values as pages for the GPU kernels: (k pages, v pages, k
        scales, v scales), the scales None for an f16 pool."""
        (k, ks), (v, vs) = self.k[layer].pages(), self.v[layer].pages()
        return k, v, ks, vs

    def f16_slabs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A layer's f16 key and value slabs (slots, Hkv, D|Dv), for kernels that read the
        pages in place; None for a q8_0 pool."""
        k, v = self.k[layer], self.v[layer]
        return None if k.quantized else (k.data, v.data)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole pages (src → dst) in every layer: copy-on-write of shared blocks."""
        for src, dst in copies:
            for layer in self.layers:
                self.k[layer].copy_block(src, dst)
                self.v[layer].copy_block(src, dst)


def slots_for(table: list[int], start: int, end: int) -> torch.Tensor:
    """Slot ids of positions start … end-1 of a sequence with block table `table`: (end-start,)."""
    positions = torch.arange(start, end)
    blocks = torch.tensor(table, dtype=torch.int64)[positions // BLOCK_SIZE]
    return blocks * BLOCK_SIZE + positions % BLOCK_SIZE
