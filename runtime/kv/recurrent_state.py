"""RecurrentStates: the per-sequence state of a model's recurrent layers (qwen35's gated
delta nets: a causal-conv window and a delta-rule matrix per layer), beside the paged KV
cache, owned by the ModelRunner.

    states = RecurrentStates()
    step = states.step(batch)        # each sequence's state, created at position 0
    for run in step.runs: ...        # a layer reads and replaces run.state.layers[i]
    states.fork(parent, child)       # an n > 1 sample starts from a copy of its parent's
    states.free(seq_id)              # finished, aborted

A sequence's state is made fresh whenever a batch computes it from position 0 (a new
sequence, or one preempted and recomputed), and must otherwise be exactly where the batch
resumes it: a sequence resumed at any other position is an InternalError, never a silent
mix-up. The state holds no KV pages, so a prefix-cache hit cannot restore it: the engine
turns prefix caching off for these models (runtime/engine/llm_engine.py). Each sequence of a
step reads and writes only its own state: batched == alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loaders.config import ModelConfig
from quant.errors import InternalError
from runtime.kv.forward_batch import ForwardBatch


def state_bytes_per_layer(config: ModelConfig) -> int:
    """One sequence's float32 state in one recurrent layer: the conv window (K-1, C) and the
    delta-rule matrices (Hv, Dv, Dk); 0 for a model without recurrent layers."""
    if not config.recurrent:
        return 0
    channels = 2 * config.ssm_k_heads * config.ssm_state + config.ssm_inner
    window = (config.ssm_conv - 1) * channels
    return 4 * (window + config.ssm_v_heads * config.ssm_state * config.ssm_state)


@dataclass
class SeqState:
    position: int = 0  # tokens the state has consumed
    layers: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # layer → state


@dataclass(frozen=True)
class Run:
    """One sequence's rows of a step: rows row … row+n-1 at positions start … start+n-1, and
    its state."""

    row: int
    n: int
    state: SeqState
    start: int = 0


@dataclass(frozen=True)
class RecurrentStep:
    runs: tuple[Run, ...]  # in row order


class RecurrentStates:
    def __init__(self) -> None:
        self.seqs: dict[int, SeqState] = {}

    def step(self, batch: ForwardBatch) -> RecurrentStep:
        """Each sequence's state for this batch (by batch.seq_ids, else by item index),
        advanced to the position after its rows: the layers then update it in place."""
        keys = batch.seq_ids if batch.seq_ids is not None else list(range(len(batch.runs)))
        runs = []
        for key, (row, n, start) in zip(keys, batch.runs, strict=True):
            state = SeqState() if start == 0 else self.seqs.get(key)
            if state is None or state.position != start:
                at = "none" if state is None else f"position {state.position}"
                raise InternalError(
                    f"sequence {key} resumes at position {start} but its recurrent state is at {at}"
                )
            state.position = start + n
            self.seqs[key] = state
            runs.append(Run(row, n, state, start))
        return RecurrentStep(tuple(runs))

    def fork(self, parent: int, child: int) -> None:
        """The child's state: a copy of the parent's (an n > 1 sample forked after prefill)."""
        source = self.seqs[parent]
        layers = {i: tuple(t.clone() for t in ts) for i, ts in source.layers.items()}
        self.seqs[child] = SeqState(source.position, layers)

    def free(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def nbytes(self) -> int:
        """Bytes the live sequences' states hold."""
        return sum(
            t.numel() * t.element_size()
            for s in self.seqs.values()
            for ts in s.layers.values()
            for t in ts
        )
