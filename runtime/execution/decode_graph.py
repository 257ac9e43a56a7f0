"""DecodeGraphs: the decode step of a model whose blocks all run on the GPU, captured as CUDA
graphs, one per batch-size bucket.

A decode step launches a dozen small kernels per layer (norms, three to five GEMVs, RoPE, the
KV write, attention, the activation). On a small model or a fast card each does microseconds
of work, and launching them one by one from Python costs more than the weights take to read.
A CUDA graph replays the whole step with one launch.

Inputs cross through static buffers. Per bucket of B rows (1, 2, 4, 8, then multiples of 16
up to max_batch): a host staging buffer per dtype (pinned on CUDA), filled from the step's
embeddings, RoPE tables, KV slots, layer tables and context lengths, then copied in one
transfer per dtype to the device mirror that the graph reads. A step of n < B sequences pads
the rest: slot −1 (no KV write), context length 1 over layer 0, zero embeddings; their rows
are computed and dropped. Block tables are max_blocks wide (num_ctx / 16).

A bucket is captured the first time a step of its size comes, after two warm-up runs that
compile the Triton kernels for its shapes (a few hundred ms once). Steps that are not
decode-only, are wider than max_blocks or larger than the largest bucket return None, and the
caller (runtime/execution/model_runner.py) runs the model eagerly. Without CUDA, capture=False runs the very same static-buffer
step eagerly: everything but the capture itself is tested on the CPU (tests/test_decode_graph.py).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from kernels.triton_linear import TritonLinear
from runtime.kv.attention_backends import LayerAttention
from runtime.kv.forward_batch import ForwardBatch
from runtime.kv.kv_pool import BLOCK_SIZE, KVPool

log = logging.getLogger(__name__)

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def buckets(max_batch: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, 8, 16, 32, 48, … up to max_batch (which is one)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return [*sizes, max_batch]


def unsupported(model) -> str | None:
    """Why this model cannot run graphed decode steps; None when it can."""
    if model.config.recurrent:
        return "its recurrent layers keep per-sequence state outside the graph"
    for i, layer in enumerate(model.layers):
        if not layer.triton:
            return f"layer {i} runs on the CPU"
        for name in LINEARS:
            if type(getattr(layer, name)) is not TritonLinear:
                return f"blk.{i} {name} is not a GPU linear (a CPU pin or a LoRA adapter)"
    return None


class _Staged:
    """Named tensors in one host buffer per dtype and its device mirror: fill .host[name],
    then upload() copies each dtype's whole buffer in one transfer."""

    def __init__(
        self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device
    ) -> None:
        pin = device.type == "cuda"
        self.host: dict[str, torch.Tensor] = {}
        self.dev: dict[str, torch.Tensor] = {}
        self._pairs = []
        for dtype in dict.fromkeys(dt for _, dt in shapes.values()):
            names = [n for n, (_, dt) in shapes.items() if dt == dtype]
            total = sum(math.prod(shapes[n][0]) for n in names)
            host = torch.zeros(total, dtype=dtype, pin_memory=pin)
            dev = torch.zeros(total, dtype=dtype, device=device)
            self._pairs.append((host, dev))
            at = 0
            for n in names:
                shape = shapes[n][0]
                self.host[n] = host[at : at + math.prod(shape)].view(shape)
                self.dev[n] = dev[at : at + math.prod(shape)].view(shape)
                at += math.prod(shape)
        self._copied = torch.cuda.Event() if pin else None

    def wait(self) -> None:
        """Until the last upload has left the host buffers (before they are refilled)."""
        if self._copied is not None:
            self._copied.synchronize()

    def upload(self) -> None:
        for host, dev in self._pairs:
            dev.copy_(host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()


@dataclass
class _Bucket:
    rows: int
    inputs: _Staged
    graph: torch.cuda.CUDAGraph | None = None  # once captured
    out: torch.Tensor | None = None  # the captured step's output (rows, V) or (rows, E)
    steps: int = 0


class DecodeGraphs:
    def __init__(
        self, model, pool: KVPool, max_blocks: int, max_batch: int, capture: bool | None = None
    ) -> None:
        """model: every layer on the GPU (see `unsupported`); max_blocks: block-table width
        (num_ctx / 16, rounded up); capture: CUDA graphs (default: when the model is on a
        CUDA device), else the static-buffer step runs eagerly."""
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"decode graphs need every layer on the GPU: {why}")
        self.model, self.pool = model, pool
        self.device = model.layers[0].device
        self.max_blocks, self.sizes = max_blocks, buckets(max_batch)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.with_head = model.head_device == self.device
        self._buckets: dict[int, _Bucket] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.failed: str | None = None  # set when a capture failed: every step then runs eagerly

    @classmethod
    def for_engine(cls, model, pool: KVPool, num_ctx: int, max_batch: int) -> DecodeGraphs | None:
        """Graphs when there is CUDA, every layer is on it and TANDEM_CUDA_GRAPHS is not 0."""
        if not torch.cuda.is_available() or os.environ.get("TANDEM_CUDA_GRAPHS", "1") == "0":
            return None
        why = unsupported(model)
        if why is not None:
            log.info("decode steps run without CUDA graphs: %s", why)
            return None
        return cls(model, pool, -(-num_ctx // BLOCK_SIZE), max_batch)

    def run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Logits (n, V) of a decode-only batch of n sequences; None when this step is not
        one the graphs take (the caller then runs the model eagerly)."""
        d, n = batch.decode, batch.tokens.shape[0]
        if (
            self.failed
            or d is None
            or batch.seqs
            or n > self.sizes[-1]
            or d.tables.shape[1] > self.max_blocks
            or batch.logit_rows.shape[0] != n
        ):
            return None
        bucket = self._bucket(next(b for b in self.sizes if b >= n))
        self._fill(bucket, batch)
        if self.capture and bucket.graph is None:
            self._capture(bucket)
            if self.failed:
                return None
        if bucket.graph is not None:
            bucket.graph.replay()
            out = bucket.out
            assert out is not None  # _capture sets it with the graph
        else:
            out = self._step(bucket)
        bucket.steps += 1
        out = out[:n].clone()
        return out if self.with_head else self.model.logits(out.to(self.model.head_device))

    # ---- buffers ---------------------------------------------------------------------
    def _bucket(self, rows: int) -> _Bucket:
        if rows not in self._buckets:
            c = self.model.config
            f32, i64 = torch.float32, torch.int64
            shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"x": ((rows, c.n_embd), f32)}
            for swa in self.model.rope_tables(torch.zeros(1, dtype=torch.int64)):
                shapes[f"cos{swa:d}"] = ((rows, 1, c.head_dim // 2), f32)
                shapes[f"sin{swa:d}"] = ((rows, 1, c.head_dim // 2), f32)
            shapes |= {
                "slots": ((rows,), i64),
                "lengths": ((rows,), i64),
                "tables": ((rows, self.max_blocks), i64),
            }
            staged = _Staged(shapes, self.device)
            staged.host["slots"].fill_(-1)  # until filled: padding rows only
            staged.host["lengths"].fill_(1)
            staged.upload()
            self._buckets[rows] = _Bucket(rows, staged)
        return self._buckets[rows]

    def _fill(self, bucket: _Bucket, batch: ForwardBatch) -> None:
        """The step's inputs into the bucket's host buffers (rows past n: padding), uploaded."""
        staged, n, d = bucket.inputs, batch.tokens.shape[0], batch.decode
        assert d is not None  # run() takes decode-only batches
        staged.wait()
        h = staged.host
        h["x"][:n] = self.model.embed_rows(batch.tokens)
        h["x"][n:] = 0
        for swa, (cos, sin) in self.model.rope_tables(batch.positions).items():
            h[f"cos{swa:d}"][:n], h[f"sin{swa:d}"][:n] = cos, sin
        h["slots"][:n] = batch.slots
        h["slots"][n:] = -1
        h["lengths"][:n] = d.lengths
        h["lengths"][n:] = 1
        h["tables"].zero_()
        h["tables"][:n, : d.tables.shape[1]] = d.tables
        staged.upload()

    # ---- the step --------------------------------------------------------------------
    def _step(self, bucket: _Bucket) -> torch.Tensor:
        """The model's layers on the static inputs: logits (rows, V) with_head, else the
        final hidden state (rows, E)."""
        v = bucket.inputs.dev
        tables = {
            swa: (v[f"cos{swa:d}"], v[f"sin{swa:d}"]) for swa in (False, True) if f"cos{swa:d}" in v
        }
        step = ForwardBatch.decode_only(v["slots"], v["tables"], v["lengths"])
        x = self.model.run_layers(
            v["x"], tables, LayerAttention(self.model.layers, step, self.pool)
        )
        return self.model.logits(x) if self.with_head else x

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up on a side stream (compiling the kernels), then capture the step."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                bucket.out = self._step(bucket)
            bucket.graph = graph
        except Exception as err:  # keep serving: every later step runs eagerly
            self.failed = f"{type(err).__name__}: {err}"
            log.warning(
                "CUDA graph capture failed (%s); decode steps run without graphs", self.failed
            )
