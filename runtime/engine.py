"""Engine: one model's request engine, driven by a single background thread.

Thread-safe API (the server and `tandem run` use only this):

    engine = Engine(lm, EngineOptions(num_ctx=4096, max_num_seqs=16))
    handle = engine.submit(prompt_ids, params, sink)   # sink(Event) is called from the
                                                       # engine thread, one Event per token
    engine.abort(handle.request_id)                    # stop at the next step, free its KV
    engine.stats()                                     # EngineStats snapshot for /metrics
    engine.close()

`submit` raises ContextLengthError (prompt does not fit), QueueFullError (the waiting queue
is full: HTTP 503 with Retry-After) or EngineClosedError synchronously; everything after
that arrives through the sink. A request with params.n = k produces events for indexes
0 … k-1; each index ends with exactly one Event whose delta.finish_reason is set
("stop", "length" or "abort"), or an Event carrying `error`.

PLACEHOLDER IMPLEMENTATION: requests run one after another through Generation. The paged,
continuously batched engine replaces the internals behind the same API.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from runtime.errors import ContextLengthError, EngineClosedError, QueueFullError, TandemError
from runtime.generation import Delta, Generation
from runtime.loaded_model import LoadedModel
from runtime.sampling_params import SamplingParams


@dataclass
class EngineOptions:
    num_ctx: int = 4096  # per sequence
    max_num_seqs: int = 16  # sequences decoded together in one step
    max_waiting: int = 512  # requests queued beyond that get QueueFullError
    kv_cache_type: str = "f16"  # or "q8_0"
    num_blocks: int | None = None  # KV pool size in 16-token blocks; None: sized from num_ctx
    max_step_tokens: int = 512  # per-step token budget (chunked prefill)


@dataclass
class Event:
    request_id: str
    index: int  # which of the request's n samples
    delta: Delta | None = None
    error: TandemError | None = None


@dataclass
class RequestHandle:
    request_id: str
    prompt_tokens: int


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    kv_block_size: int = 16
    kv_bytes: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_total: int = 0
    preemptions_total: int = 0
    prefix_cache_hits_total: int = 0  # tokens served from the prefix cache
    extra: dict = field(default_factory=dict)


Sink = Callable[[Event], None]


class Engine:
    def __init__(self, lm: LoadedModel, options: EngineOptions | None = None) -> None:
        self.lm = lm
        self.options = options or EngineOptions()
        self._queue: queue.Queue = queue.Queue()
        self._aborted: set[str] = set()
        self._ids = itertools.count()
        self._stats = EngineStats()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> RequestHandle:
        if self._closed:
            raise EngineClosedError("the engine is shut down")
        if not prompt_ids or len(prompt_ids) >= self.options.num_ctx:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds "
                f"{self.options.num_ctx}; shorten the prompt or raise num_ctx")
        if self._queue.qsize() >= self.options.max_waiting:
            raise QueueFullError(f"{self.options.max_waiting} requests are waiting; retry later")
        request_id = f"req-{next(self._ids)}"
        self._queue.put((request_id, list(prompt_ids), params, sink))
        with self._lock:
            self._stats.requests_total += 1
        return RequestHandle(request_id, len(prompt_ids))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def stats(self) -> EngineStats:
        with self._lock:
            return replace(self._stats, waiting=self._queue.qsize())

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            request_id, ids, params, sink = item
            for i in range(params.n):
                seeded = replace(params, seed=params.seed + i) if params.seed is not None else params
                self._run_one(request_id, i, ids, seeded, sink)

    def _run_one(self, request_id, index, ids, params, sink) -> None:
        with self._lock:
            self._stats.running = 1
            self._stats.prompt_tokens_total += len(ids)
        try:
            for delta in Generation(self.lm, ids, params, self.options.num_ctx):
                if request_id in self._aborted:
                    sink(Event(request_id, index, Delta(None, "", finish_reason="abort")))
                    return
                with self._lock:
                    self._stats.generation_tokens_total += 1
                sink(Event(request_id, index, delta))
        except TandemError as err:
            sink(Event(request_id, index, error=err))
        finally:
            with self._lock:
                self._stats.running = 0
