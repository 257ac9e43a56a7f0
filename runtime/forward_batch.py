"""ForwardBatch: one engine step's input to Model.forward_batch.

The new tokens of every scheduled sequence are concatenated into rows 0 … T-1; each sequence
(SeqRows) has a contiguous run of rows, the positions they take, the KV slots they write,
and the slots of its whole context (positions 0 … start+n-1) that its attention reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.kv_pool import slots_for


@dataclass
class SeqRows:
    row: int  # first row of this sequence in the batch
    n: int  # new tokens
    start: int  # position of the first new token
    context_slots: torch.Tensor  # (start + n,) int64: slots of positions 0 … start+n-1


@dataclass
class ForwardBatch:
    tokens: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slots: torch.Tensor  # (T,) int64: where each row's K/V is written
    seqs: list[SeqRows]
    logit_rows: torch.Tensor  # (R,) int64: rows whose logits are wanted

    @classmethod
    def build(cls, items: list[tuple[list[int], int, list[int], bool]]) -> ForwardBatch:
        """items: per sequence (new token ids, start position, block table, wants logits)."""
        tokens, positions, slots, seqs, logit_rows, row = [], [], [], [], [], 0
        for ids, start, table, wants_logits in items:
            n = len(ids)
            context = slots_for(table, 0, start + n)
            tokens.extend(ids)
            positions.append(torch.arange(start, start + n))
            slots.append(context[start:])
            seqs.append(SeqRows(row, n, start, context))
            row += n
            if wants_logits:
                logit_rows.append(row - 1)
        return cls(torch.tensor(tokens, dtype=torch.int64), torch.cat(positions),
                   torch.cat(slots), seqs, torch.tensor(logit_rows, dtype=torch.int64))
