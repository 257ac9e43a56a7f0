"""ModelRunner: a loaded model's execution state — its KV pool (each layer's pages on that
layer's device), its CUDA graphs, the step's inputs — and the one call that runs a step.

    runner = ModelRunner(model, num_blocks, kv_cache_type, num_ctx, max_batch)
    batch = runner.prepare(scheduled, table)  # or ForwardBatch.build([...])
    logits = runner.run(batch)                 # (R, V): one row per batch.logit_rows
    runner.release(seq_id)                     # a sequence ended: its recurrent state goes

A model with recurrent layers (qwen35) also keeps each sequence's state here
(runtime/kv/recurrent_state.py), keyed by the batch's sequence ids.

`run` replays the decode step as a CUDA graph where it can (every layer on CUDA, a
decode-only step within the captured sizes; runtime/execution/decode_graph.py), and otherwise runs the
model eagerly: embeddings, every layer with its attention backend over the pool, the head on
the rows whose logits are wanted. The engine (runtime/engine/llm_engine.py) and `tandem bench` run
models only through here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.thread_policy import forward_threads
from runtime.execution.decode_graph import DecodeGraphs
from runtime.kv.attention_backends import LayerAttention
from runtime.kv.forward_batch import ForwardBatch
from runtime.kv.kv_pool import BLOCK_SIZE, KVPool
from runtime.kv.recurrent_state import RecurrentStates
from runtime.models import Model


class ModelRunner:
    def __init__(
        self,
        model: Model,
        num_blocks: int,
        kv_cache_type: str = "f16",
        num_ctx: int | None = None,
        max_batch: int = 1,
        graphs: bool | None = None,
    ) -> None:
        """num_blocks: the pool's size in BLOCK_SIZE-token blocks; num_ctx: the longest
        sequence (default: the whole pool), which sizes the graphs' block tables; max_batch:
        the most sequences in one step; graphs: CUDA graphs for decode steps (None: where
        there is CUDA and every layer is on it, unless TANDEM_CUDA_GRAPHS=0; False: never)."""
        self.model = model
        self.pool = KVPool(
            model.config, num_blocks, kv_cache_type, [block.device for block in model.layers]
        )
        # per-sequence state of recurrent layers (qwen35's delta nets), None without them
        self.states = RecurrentStates() if model.config.recurrent else None
        num_ctx = num_ctx or num_blocks * BLOCK_SIZE
        self.graphs = (
            DecodeGraphs.for_engine(model, self.pool, num_ctx, max_batch)
            if graphs is not False
            else None
        )

    @property
    def kv_bytes(self) -> int:
        """Bytes the KV pool spans (committed as its slots are written)."""
        return self.pool.nbytes

    def kv_bytes_on(self, device: torch.device) -> int:
        return self.pool.nbytes_on(device)

    @property
    def cuda_graphs(self) -> bool:
        return self.graphs is not None

    @staticmethod
    def prepare(scheduled: list, table: Callable[[int], list[int]]) -> ForwardBatch:
        """The step's input: scheduled (sequence, new tokens) pairs, table(seq_id) → its
        block table. A sequence's logits are wanted when this step computes all its tokens."""
        return ForwardBatch.build(
            [
                (
                    seq.token_ids[seq.num_computed : seq.num_computed + n],
                    seq.num_computed,
                    table(seq.seq_id),
                    n == seq.pending,
                )
                for seq, n in scheduled
            ],
            [seq.seq_id for seq, _ in scheduled],
        )

    def release(self, seq_id: int) -> None:
        """A sequence is finished, aborted or failed: drop its recurrent state."""
        if self.states is not None:
            self.states.free(seq_id)

    def fork(self, parent: int, child: int) -> None:
        """An n > 1 sample forked from `parent`: its recurrent state starts as a copy."""
        if self.states is not None:
            self.states.fork(parent, child)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: whole pages src → dst in every layer."""
        self.pool.copy_blocks(copies)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The step's logits (R, V), on the head's device, for batch.logit_rows."""
        if self.graphs is not None:
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits
        model = self.model
        with forward_threads(model.num_threads):
            x = model.run_layers(
                model.embed_rows(batch.tokens),
                model.rope_tables(batch.positions),
                LayerAttention(
                    model.layers,
                    batch,
                    self.pool,
                    self.states.step(batch) if self.states is not None else None,
                ),
            )
            return model.logits(x[batch.logit_rows.to(x.device)])
