"""ForwardBatch: one engine step's input to the model (runtime/execution/model_runner.py).

The new tokens of every scheduled sequence are concatenated into rows 0 … T-1; each sequence
(SeqRows) has a contiguous run of rows, the positions they take, the KV slots they write,
and the slots of its whole context (positions 0 … start+n-1) that its attention reads.

Sequences that add one token (decodes) form a DecodeGroup instead: their attention runs in
one call over the pages their block tables name (no per-step copy of their contexts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from runtime.kv.kv_pool import BLOCK_SIZE, slots_for


@dataclass
class SeqRows:
    row: int  # first row of this sequence in the batch
    n: int  # new tokens
    start: int  # position of the first new token
    context_slots: torch.Tensor  # (start + n,) int64: slots of positions 0 … start+n-1


@dataclass
class DecodeGroup:
    """B one-token sequences: their block tables and context lengths. The padded context
    slots (for the gathered-SDPA fallback) are derived from those only when asked for."""

    rows: torch.Tensor | None  # (B,) int64: their rows in the batch (None: rows 0 … B-1)
    lengths: torch.Tensor  # (B,) int64: context lengths (the query is at position length-1)
    tables: torch.Tensor  # (B, max_blocks) int32: block tables, padding → 0
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> DecodeGroup:
        rows = self.rows.to(device) if self.rows is not None else None
        return DecodeGroup(rows, self.lengths.to(device), self.tables.to(device))

    @functools.cached_property
    def width(self) -> int:
        """L, the longest context."""
        return int(self.lengths.max())

    @functools.cached_property
    def slots(self) -> torch.Tensor:
        """(B * L,) int64: every sequence's context slots, row-major; positions past a
        sequence's length repeat its last position (masked: read, but never a slot that was
        not written — the pool's unwritten memory may hold inf or NaN)."""
        positions = torch.arange(self.width, device=self.tables.device)  # (L,)
        last = (self.lengths - 1).to(positions.device)[:, None]  # (B, 1)
        positions = torch.minimum(positions[None, :], last)  # (B, L)
        blocks = self.tables.long().gather(1, positions // BLOCK_SIZE)  # (B, L)
        return (blocks * BLOCK_SIZE + positions % BLOCK_SIZE).flatten()

    def mask(self, window: int) -> torch.Tensor:
        """(B, 1, 1, L) bool: True where the query may attend (inside its context and,
        with a sliding window, distance < window)."""
        if window not in self._masks:
            k_pos = torch.arange(self.width, device=self.lengths.device)[None, :]  # (1, L)
            q_pos = (self.lengths - 1)[:, None]  # (B, 1)
            allowed = k_pos <= q_pos
            if window:
                allowed &= (q_pos - k_pos) < window
            self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]


@dataclass
class ForwardBatch:
    tokens: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slots: torch.Tensor  # (T,) int64: where each row's K/V is written
    seqs: list[SeqRows]  # sequences attended one by one (prefill chunks)
    logit_rows: torch.Tensor  # (R,) int64: rows whose logits are wanted
    decode: DecodeGroup | None = None  # one-token sequences, attended together
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # per item: (row, n, start)
    seq_ids: list[int] | None = None  # per item: its sequence (recurrent state's key)

    @classmethod
    def build(
        cls, items: list[tuple[list[int], int, list[int], bool]], seq_ids: list[int] | None = None
    ) -> ForwardBatch:
        """items: per sequence (new token ids, start position, block table, wants logits);
        seq_ids: their sequences' ids, where the model keeps recurrent state by sequence."""
        # Positions and slots as Python ints, made tensors once: a decode's one slot is
        # cheaper to compute by hand than through a handful of tiny tensor ops.
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs, logit_rows, row = [], [], 0
        runs: list[tuple[int, int, int]] = []
        decodes: list[tuple[int, int, list[int]]] = []  # (row, context length, block table)
        for ids, start, table, wants_logits in items:
            n = len(ids)
            runs.append((row, n, start))
            tokens.extend(ids)
            positions.extend(range(start, start + n))
            if n == 1:  # a decode: one slot to write; its context is read through its table
                slots.append(table[start // BLOCK_SIZE] * BLOCK_SIZE + start % BLOCK_SIZE)
                decodes.append((row, start + 1, table[: -(-(start + 1) // BLOCK_SIZE)]))
            else:
                context = slots_for(table, 0, start + n)
                slots.extend(context[start:].tolist())
                seqs.append(SeqRows(row, n, start, context))
            row += n
            if wants_logits:
                logit_rows.append(row - 1)
        return cls(
            torch.tensor(tokens, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
            torch.tensor(slots, dtype=torch.int64),
            seqs,
            torch.tensor(logit_rows, dtype=torch.int64),
            _decode_group(decodes),
            runs,
            seq_ids,
        )

    @classmethod
    def decode_only(
        cls, slots: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
    ) -> ForwardBatch:
        """B one-token sequences whose index tensors are already on their device (a CUDA
        graph's static inputs): slots (B,), tables (B, W), lengths (B,). Only what attention
        reads is set."""
        empty = slots.new_empty(0)
        return cls(empty, empty, slots, [], empty, DecodeGroup(None, lengths, tables))

    def on(self, device: torch.device) -> ForwardBatch:
        """This batch's index tensors on `device` (itself on the CPU or where they are
        already), made once per device."""
        if device.type == "cpu" or self.slots.device == device:
            return self
        cache = self.__dict__.setdefault("_copies", {})
        if device not in cache:
            seqs = [SeqRows(s.row, s.n, s.start, s.context_slots.to(device)) for s in self.seqs]
            cache[device] = ForwardBatch(
                self.tokens,
                self.positions,
                self.slots.to(device),
                seqs,
                self.logit_rows,
                self.decode.to(device) if self.decode is not None else None,
                self.runs,
                self.seq_ids,
            )
        return cache[device]


def _decode_group(decodes: list[tuple[int, int, list[int]]]) -> DecodeGroup | None:
    if not decodes:
        return None
    width = max(len(t) for _, _, t in decodes)
    tables = torch.tensor([t + [0] * (width - len(t)) for _, _, t in decodes], dtype=torch.int32)
    return DecodeGroup(
        torch.tensor([r for r, _, _ in decodes]), torch.tensor([n for _, n, _ in decodes]), tables
    )
