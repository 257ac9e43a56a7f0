"""Engine: one model's LLMEngine driven by a single background thread — the thread-safe
API the server uses.

    engine = Engine(lm, lm.options.engine_options())  # the model's resolved RunOptions
    handle = engine.submit(prompt_ids, params, sink)   # sink(Event) is called from the
                                                       # engine thread, one Event per token
    engine.abort(handle.request_id)                    # stop at the next step, free its KV
    engine.stats()                                     # EngineStats snapshot for /metrics
    vectors = engine.embed([ids, ...]).result()        # (B, E) unit vectors (a Future)
    engine.close()

`submit` raises ContextLengthError (prompt does not fit), QueueFullError (the waiting queue
is full: HTTP 503 with Retry-After) or EngineClosedError synchronously; everything after
that arrives through the sink. Embedding jobs run on the same thread, between steps: every
job waiting is packed into one prefill-only forward (runtime/engine/embedder.py; no KV kept).
A request with params.n = k produces events for indexes
0 … k-1; each index ends with exactly one Event whose delta.finish_reason is set
("stop", "length" or "abort"), or an Event carrying `error`.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from quant.errors import EngineClosedError, QueueFullError, TandemError
from runtime.engine.embedder import Embedder
from runtime.engine.llm_engine import (
    EngineOptions,
    EngineStats,
    Event,
    LLMEngine,
    as_tandem_error,
    check_generates,
)
from runtime.engine.sequence import check_prompt
from runtime.loaded_model import LoadedModel
from runtime.sampling_params import SamplingParams

__all__ = ["Engine", "EngineOptions", "EngineStats", "Event", "RequestHandle"]

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]


@dataclass
class RequestHandle:
    request_id: str
    prompt_tokens: int


class Engine:
    def __init__(self, lm: LoadedModel, options: EngineOptions | None = None) -> None:
        self.lm = lm
        self.core = LLMEngine(lm, options)
        self.options = self.core.options
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._incoming: list[tuple[str, list[int], SamplingParams, Sink]] = []
        self._aborts: list[str] = []
        self._embeds: list[tuple[list[list[int]], Future]] = []
        self._embedder: Embedder | None = None
        self._sinks: dict[str, Sink] = {}
        self._stats = self.core.snapshot()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    @property
    def num_ctx(self) -> int:
        return self.core.num_ctx

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> RequestHandle:
        check_generates(self.lm)
        check_prompt(prompt_ids, self.core.num_ctx)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is shut down; no new requests are taken")
            if self._stats.waiting + len(self._incoming) >= self.options.max_waiting:
                raise QueueFullError(
                    f"{self.options.max_waiting} requests are already waiting; retry shortly"
                )
            request_id = f"req-{next(self._ids)}"
            self._incoming.append((request_id, list(prompt_ids), params, sink))
            self._cond.notify()
        return RequestHandle(request_id, len(prompt_ids))

    def embed(self, prompts: list[list[int]]) -> Future:
        """A Future of the prompts' pooled unit vectors (B, E), computed on the engine thread."""
        for ids in prompts:
            check_prompt(ids, self.core.num_ctx)
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is shut down; no new requests are taken")
            self._embeds.append((prompts, future))
            self._cond.notify()
        return future

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            return self._stats

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ---- the engine thread ---------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._incoming
                    or self._aborts
                    or self._embeds
                    or self._closed
                    or self.core.has_unfinished
                ):
                    self._cond.wait()
                if self._closed:
                    break
                incoming, self._incoming = self._incoming, []
                aborts, self._aborts = self._aborts, []
                embeds, self._embeds = self._embeds, []
            if embeds:
                self._run_embeds(embeds)
            if not (incoming or aborts or self.core.has_unfinished):
                continue
            events = []
            for request_id, ids, params, sink in incoming:
                events += self._add(request_id, ids, params, sink)
            try:
                for request_id in aborts:
                    events += self.core.abort(request_id)
                events += self.core.step()  # fails only what a failure touched; never raises
            except Exception as err:  # a bug outside the step's own guards: fail what runs
                log.exception("engine step failed")
                events += self.core.fail_all(err)
            self._deliver(events)
            try:
                stats = self.core.snapshot()
            except Exception:
                log.exception("engine statistics failed")
                stats = self._stats
            with self._cond:
                self._stats = stats
        for request_id in list(self.core.requests):
            self._deliver(self.core.abort(request_id))
        for _, future in self._embeds:
            future.set_exception(EngineClosedError("the engine shut down"))

    def _run_embeds(self, jobs: list[tuple[list[list[int]], Future]]) -> None:
        """Every waiting job in one forward; a failure fails those jobs only."""
        try:
            if self._embedder is None:
                self._embedder = Embedder(self.lm)
            vectors = self._embedder.embed([ids for prompts, _ in jobs for ids in prompts])
        except Exception as err:
            if not isinstance(err, TandemError):
                log.exception("embedding failed")
            for _, future in jobs:
                future.set_exception(as_tandem_error(err))
            return
        start = 0
        for prompts, future in jobs:
            future.set_result(vectors[start : start + len(prompts)])
            start += len(prompts)

    def _add(self, request_id, ids, params, sink) -> list[Event]:
        self._sinks[request_id] = sink
        try:
            self.core.add_request(request_id, ids, params)
        except Exception as err:  # QueueFullError, a bad request or a bug: only this one fails
            if not isinstance(err, TandemError):
                log.exception("adding %s failed", request_id)
            return [Event(request_id, i, error=as_tandem_error(err)) for i in range(params.n)]
        return []

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            sink = self._sinks.get(event.request_id)
            if sink is None:
                continue
            try:
                sink(event)
            except Exception:  # a broken sink must not stop the engine
                log.exception("event sink for %s failed", event.request_id)
        for request_id in {e.request_id for e in events}:
            if request_id not in self.core.requests:
                self._sinks.pop(request_id, None)
