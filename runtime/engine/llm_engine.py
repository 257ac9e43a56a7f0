"""LLMEngine: the synchronous core that runs many requests together over one paged KV pool.

    engine = LLMEngine(lm, EngineOptions(...))
    engine.add_request("r1", prompt_ids, params)   # raises ContextLengthError / QueueFullError
    while engine.has_unfinished:
        for event in engine.step(): ...            # Event(request_id, index, delta | error)
    engine.abort("r1")                             # → its final "abort" events

Each step: the scheduler picks tokens (continuous batching, chunked prefill, preemption),
copy-on-write pages are copied, one ModelRunner.run runs them all, and every sequence
whose pending tokens are now computed samples its next token. A request with n > 1
prefills once; at its first sample the other n-1 samples fork from it, sharing its blocks.
Not thread-safe: runtime.engine.engine.Engine drives it from one thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field, replace

import torch

from kernels.delta_rule import CHUNK_ALIGN
from quant.errors import (
    InternalError,
    InvalidParameterError,
    QueueFullError,
    TandemError,
    UnsupportedError,
)
from runtime.engine.block_manager import BlockManager
from runtime.engine.scheduler import Scheduler, Step
from runtime.engine.sequence import Delta, Sequence, check_prompt
from runtime.execution.model_runner import ModelRunner
from runtime.kv.kv_pool import BLOCK_SIZE, kv_bytes_per_token
from runtime.loaded_model import LoadedModel
from runtime.run_options import EngineOptions
from runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Event:
    request_id: str
    index: int  # which of the request's n samples
    delta: Delta | None = None
    error: TandemError | None = None


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    kv_block_size: int = BLOCK_SIZE
    kv_bytes: int = 0  # the pool's size
    kv_cache_type: str = "f16"
    kv_bytes_saved: int = 0  # against an f16 pool of the same size (q8_0 saves 30/64)
    prompt_tokens_total: int = 0  # computed prompt tokens (cache hits excluded)
    generation_tokens_total: int = 0
    requests_total: int = 0
    preemptions_total: int = 0
    prefix_cache_hits_total: int = 0  # prompt tokens served from the prefix cache
    steps_total: int = 0


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: dict[int, Sequence] = field(default_factory=dict)  # index → sequence
    open: int = 1  # samples not finished yet


def check_generates(lm: LoadedModel) -> None:
    """UnsupportedError for a model that cannot generate (an encoder such as bert)."""
    if lm.config.encoder:
        raise UnsupportedError(
            f"{lm.name} is an embedding model ({lm.config.arch}): it cannot chat or generate; "
            "ask it for embeddings (/v1/embeddings, /api/embed, LLM.embed)"
        )


class LLMEngine:
    def __init__(self, lm: LoadedModel, options: EngineOptions | None = None) -> None:
        self.lm = lm
        self.options = options = options or EngineOptions()
        self.num_ctx = min(options.num_ctx, lm.config.n_ctx_train)
        num_blocks = options.num_blocks
        assert num_blocks is not None  # EngineOptions.__post_init__ sets it when not given
        self.runner = ModelRunner(
            lm.model,
            num_blocks,
            options.kv_cache_type,
            self.num_ctx,
            options.max_num_seqs,
            graphs=False if lm.config.encoder else None,  # an encoder never decodes
        )
        # a recurrent model's state is not in its KV pages: no prefix cache can resume it
        self.blocks = BlockManager(num_blocks, prefix_caching=not lm.config.recurrent)
        self.scheduler = Scheduler(
            self.blocks,
            options.max_num_seqs,
            options.max_step_tokens,
            align=CHUNK_ALIGN if lm.config.recurrent else 1,  # where the delta rule's chunks fall
        )
        self.requests: dict[str, _Request] = {}
        self._owner: dict[int, tuple[_Request, int]] = {}  # seq id → (request, index)
        self._seq_ids = itertools.count()
        f16_bytes = num_blocks * BLOCK_SIZE * kv_bytes_per_token(lm.config, "f16")
        self.stats = EngineStats(
            kv_bytes=self.runner.kv_bytes,
            kv_cache_type=options.kv_cache_type,
            kv_bytes_saved=f16_bytes - self.runner.kv_bytes,
        )
        log.info(
            "KV cache: %d blocks of %d tokens, %s, %.1f MiB (f16 would take %.1f MiB)",
            options.num_blocks,
            BLOCK_SIZE,
            options.kv_cache_type,
            self.runner.kv_bytes / 2**20,
            f16_bytes / 2**20,
        )

    # ---- requests ------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        check_generates(self.lm)
        check_prompt(prompt_ids, self.num_ctx)
        if request_id in self.requests:
            raise InvalidParameterError(f"request id {request_id!r} is already in use")
        if len(self.scheduler.waiting) >= self.options.max_waiting:
            raise QueueFullError(
                f"{self.options.max_waiting} requests are already waiting; retry shortly"
            )
        request = _Request(request_id, list(prompt_ids), params, open=params.n)
        seq = self._new_sequence(request, 0, params)  # may refuse params (stop strings)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        self.stats.requests_total += 1

    def abort(self, request_id: str) -> list[Event]:
        """Stop a request now, freeing its blocks; → the final event of each open sample."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return []
        events = []
        for index, seq in request.seqs.items():
            self._drop(seq)
            if not seq.finished:
                events.append(Event(request_id, index, seq.abort()))
        if 0 < len(request.seqs) < request.params.n:  # samples not forked yet end too
            events += [
                Event(request_id, i, Delta(None, "", finish_reason="abort"))
                for i in range(len(request.seqs), request.params.n)
            ]
        return events

    # ---- the step ------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Run one step → its events. Never raises: a failure fails only the requests it
        touched (a bad sample: that request; the forward: the step's requests; scheduling:
        every request), unexpected ones as InternalError, and the engine goes on."""
        try:
            step = self.scheduler.schedule()
        except Exception as err:
            log.exception("scheduling failed")
            return self.fail_all(err)
        if not step.scheduled:
            return []
        now = time.perf_counter()
        try:
            self.runner.copy_blocks(step.copies)
            batch = self.runner.prepare(step.scheduled, self.blocks.table)
            with torch.inference_mode():
                logits = self.runner.run(batch)
        except Exception as err:  # a bug must not take the engine down: fail this step's requests
            log.exception("forward failed")
            return self._fail_step(step, err)
        self.stats.steps_total += 1
        return self._after_forward(step, logits, now)

    def _after_forward(self, step: Step, logits: torch.Tensor, started: float) -> list[Event]:
        events, row = [], 0
        elapsed = time.perf_counter() - started
        for seq, n in step.scheduled:
            has_row = n == seq.pending  # the batch asked for this chunk's last logits
            row += has_row
            if seq.seq_id not in self._owner:  # its request already failed in this step
                continue
            try:
                seq.num_computed += n
                self.blocks.register(seq.seq_id, seq.token_ids, seq.num_computed)
                prefill = seq.num_computed <= seq.num_prompt
                if prefill:
                    self.stats.prompt_tokens_total += n
                    seq.timings.prompt_seconds += elapsed
                else:
                    seq.timings.eval_seconds += elapsed
                if has_row:
                    events += self._sample(seq, logits[row - 1])
            except Exception as err:  # only this sequence's request fails
                if not isinstance(err, TandemError):
                    log.exception("processing sequence %d failed", seq.seq_id)
                events += self._fail_request(seq, err)
        self.stats.generation_tokens_total += sum(
            1 for e in events if e.delta is not None and e.delta.token_id is not None
        )
        return events

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> list[Event]:
        request, index = self._owner[seq.seq_id]
        first = not seq.generated
        forks = self._fork(request, seq) if first and index == 0 and request.params.n > 1 else []
        events = []
        for s in [seq, *forks]:
            index = self._owner[s.seq_id][1]
            try:
                delta = s.next(logits)
            except Exception as err:  # the whole request fails; what came before stands
                if not isinstance(err, TandemError):
                    log.exception("sampling sequence %d failed", s.seq_id)
                return events + self._fail_request(s, err)
            events.append(Event(request.request_id, index, delta))
            if delta.finish_reason:
                self._finish(s)
        return events

    def _fork(self, request: _Request, parent: Sequence) -> list[Sequence]:
        """Samples 1 … n-1, sharing the parent's prompt blocks (copy-on-write)."""
        children = []
        for i in range(1, request.params.n):
            params = request.params
            if params.seed is not None:  # each sample draws from its own stream: seed + i
                params = replace(params, seed=params.seed + i)
            child = self._new_sequence(request, i, params)
            child.num_computed = parent.num_computed
            child.timings.prompt_seconds = parent.timings.prompt_seconds
            self.blocks.fork(parent.seq_id, child.seq_id)
            self.runner.fork(parent.seq_id, child.seq_id)
            self.scheduler.add_running(child)
            children.append(child)
        return children

    def _new_sequence(self, request: _Request, index: int, params: SamplingParams) -> Sequence:
        seq = Sequence(
            next(self._seq_ids), request.prompt_ids, params, self.lm.tokenizer, self.num_ctx
        )
        seq.group = request.request_id  # the scheduler shares steps out by request
        request.seqs[index] = seq
        self._owner[seq.seq_id] = (request, index)
        return seq

    def _finish(self, seq: Sequence) -> None:
        request, _ = self._owner[seq.seq_id]
        self._drop(seq)
        request.open -= 1
        if request.open == 0:
            self.requests.pop(request.request_id, None)

    def _drop(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.runner.release(seq.seq_id)
        self._owner.pop(seq.seq_id, None)

    def _fail_step(self, step: Step, err: Exception) -> list[Event]:
        events = []
        for seq, _ in step.scheduled:
            events += self._fail_request(seq, err)
        return events

    def _fail_request(self, seq: Sequence, err: Exception) -> list[Event]:
        """End seq's whole request with an error event for each of its open samples (none if
        the request is already gone); everything it held is freed."""
        owner = self._owner.get(seq.seq_id)
        if owner is None:
            return []
        error = as_tandem_error(err)
        return [Event(e.request_id, e.index, error=error) for e in self.abort(owner[0].request_id)]

    def fail_all(self, err: Exception) -> list[Event]:
        """End every request with an error (when a failure cannot be pinned on some)."""
        error = as_tandem_error(err)
        events = []
        for request_id, request in list(self.requests.items()):
            try:
                events += [
                    Event(e.request_id, e.index, error=error) for e in self.abort(request_id)
                ]
            except Exception:  # freeing failed too: forget the request regardless
                log.exception("aborting %s failed", request_id)
                self.requests.pop(request_id, None)
                for seq in request.seqs.values():
                    self._owner.pop(seq.seq_id, None)
                events += [Event(request_id, i, error=error) for i in range(request.params.n)]
        return events

    def snapshot(self) -> EngineStats:
        """A copy of the statistics with the current occupancy."""
        s = self.scheduler
        return replace(
            self.stats,
            running=len(s.running),
            waiting=len(s.waiting),
            kv_blocks_free=self.blocks.num_free,
            kv_blocks_used=self.blocks.num_blocks - self.blocks.num_free,
            preemptions_total=s.preemptions_total,
            prefix_cache_hits_total=s.cached_tokens_total,
        )


def as_tandem_error(err: Exception) -> TandemError:
    """A typed error as it is; anything else is a bug inside tandem: InternalError (HTTP 500)."""
    if isinstance(err, TandemError):
        return err
    return InternalError(f"internal error: {err} ({type(err).__name__})")
