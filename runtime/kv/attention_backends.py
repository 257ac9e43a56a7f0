"""Attention backends: how one layer writes its new keys and values into the paged KV pool
and attends over them, chosen per layer at load for the device the layer runs on.

- CPUPagedAttention: the native KV write and paged decode kernel (kernels/native/
  paged_attention.cpp) on f16 pages, torch's writer and gathered SDPA otherwise.
- TritonPagedAttention: the Triton KV-write kernel and paged decode kernel (f16 or q8_0
  pages), capturable in a CUDA graph; in Triton's CPU interpreter without CUDA.

Each has write / decode / prefill; `__call__` runs one step's rows of a layer through them:
    q (T, H, D), k (T, Hkv, D), v (T, Hkv, Dv) for the rows of a ForwardBatch → (T, H * Dv)
Decode rows (one-token sequences) are attended together over their layer tables; prefill
chunks one by one over their gathered context (SDPA with the causal / sliding-window mask).
`LayerAttention` binds a step (batch, pool) to a model's layers: the `attend(i, q, k, v,
window)` callable that the layer loop (runtime/models/base.py) calls.
"""

from __future__ import annotations

import torch

from kernels.attention import attention, decode_attention, paged_decode_attention
from runtime.kv.forward_batch import DecodeGroup, ForwardBatch
from runtime.kv.kv_pool import KVPool
from runtime.kv.recurrent_state import RecurrentStep


class PagedAttention:
    """The parts both backends share: the step's dispatch and prefill over gathered pages."""

    def __init__(self, scale: float, head_dim_v: int, softcap: float = 0.0) -> None:
        self.scale, self.head_dim_v = scale, head_dim_v
        self.softcap = softcap  # scores → cap·tanh(scores / cap) (gemma2); 0: none

    def __call__(
        self,
        layer: int,
        b: ForwardBatch,
        pool: KVPool,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """b: the step's rows on this layer's device (ForwardBatch.on); sinks: (H,) per-head
        sink logits (gpt-oss) or None."""
        self.write(layer, pool, b.slots, k, v)
        d = b.decode
        if d is None:
            return self.prefill(layer, b, pool, q, window, sinks)
        if not b.seqs:  # decodes only: row b is sequence b, no gather or scatter
            return self.decode(layer, pool, q, d, window, sinks)
        att = self.decode(layer, pool, q[d.rows], d, window, sinks)
        out = self.prefill(layer, b, pool, q, window, sinks)
        out[d.rows] = att
        return out

    def write(
        self, layer: int, pool: KVPool, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        raise NotImplementedError

    def decode(
        self,
        layer: int,
        pool: KVPool,
        q: torch.Tensor,
        d: DecodeGroup,
        window: int,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The one-token sequences' attention: q (B, H, D) → (B, H * Dv)."""
        raise NotImplementedError

    def prefill(
        self,
        layer: int,
        b: ForwardBatch,
        pool: KVPool,
        q: torch.Tensor,
        window: int,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The output buffer (T, H * Dv) with the prefill chunks' rows filled in: each chunk's
        queries over its sequence's pages so far (decode rows are left to the caller)."""
        out = q.new_empty(q.shape[0], q.shape[1] * self.head_dim_v)
        for s in b.seqs:
            rows = slice(s.row, s.row + s.n)
            # a sliding window: the chunk's first query sees back to start − window + 1 only
            first = max(0, s.start + 1 - window) if window else 0
            keys, values = pool.read(layer, s.context_slots[first:])
            out[rows] = attention(
                q[rows], keys, values, s.start - first, window, self.scale, self.softcap, sinks
            )
        return out


class CPUPagedAttention(PagedAttention):
    def write(self, layer, pool, slots, k, v) -> None:
        pool.write(layer, slots, k, v)

    def decode(self, layer, pool, q, d, window, sinks=None) -> torch.Tensor:
        """In place on the f16 pages (native), else over the sequences' gathered, padded
        contexts in one SDPA call."""
        slabs = pool.f16_slabs(layer)
        if slabs is not None:
            out = paged_decode_attention(
                q, *slabs, d.tables, d.lengths, self.scale, window, self.softcap, sinks
            )
            if out is not None:
                return out
        keys, values = pool.read(layer, d.slots)  # (B*L, Hkv, D)
        return decode_attention(
            q,
            keys.unflatten(0, (-1, d.width)),
            values.unflatten(0, (-1, d.width)),
            d.mask(window),
            self.scale,
            self.softcap,
            sinks,
        )


class TritonPagedAttention(PagedAttention):
    """Nothing here reads back to the host: a decode-only step is capturable as a CUDA graph."""

    def __init__(self, scale: float, head_dim_v: int, softcap: float = 0.0) -> None:
        super().__init__(scale, head_dim_v, softcap)
        from kernels.triton.kv_write import kv_write
        from kernels.triton.paged_attention import paged_attention_decode

        self._kv_write, self._decode = kv_write, paged_attention_decode

    def write(self, layer, pool, slots, k, v) -> None:
        k_pages, v_pages, k_scale, v_scale = pool.pages(layer)
        self._kv_write(k, v, k_pages, v_pages, slots, k_scale, v_scale)

    def decode(self, layer, pool, q, d, window, sinks=None) -> torch.Tensor:
        k_pages, v_pages, k_scale, v_scale = pool.pages(layer)
        out = self._decode(
            q.contiguous(),
            k_pages,
            v_pages,
            d.tables,
            d.lengths,
            self.scale,
            window,
            k_scale,
            v_scale,
            self.softcap,
            sinks,
        )  # (B, H, Dv)
        return out.reshape(out.shape[0], -1)


class LayerAttention:
    """One step's `attend(i, q, k, v, window)` over a model's layers: layer i's backend on
    the step's rows on its device, its KV in `pool`."""

    __slots__ = ("layers", "batch", "pool", "recurrent")

    def __init__(
        self,
        layers: list,
        batch: ForwardBatch,
        pool: KVPool,
        recurrent: RecurrentStep | None = None,
    ) -> None:
        """recurrent: the step's per-sequence states, for a model's recurrent layers."""
        self.layers, self.batch, self.pool = layers, batch, pool
        self.recurrent = recurrent

    def __call__(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
    ) -> torch.Tensor:
        layer = self.layers[i]
        sinks = getattr(layer, "sinks", None)  # gpt-oss's (runtime/models/moe.py MoELayer)
        batch = self.batch.on(layer.device)
        return layer.attention(i, batch, self.pool, q, k, v, window, sinks)
