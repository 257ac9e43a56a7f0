"""RequestStream: one request's engine events, carried from the engine thread onto the
event loop. The engine's sink only appends to the loop's Mailbox:
the events of one engine step, for every stream, cross to the loop in one hand-off (one
call_soon_threadsafe per step, not per token per stream).

    stream = RequestStream(registry, served, metrics, arrived)
    stream.submit(prompt_ids, params)         # raises ContextLengthError, QueueFullError, ...
    async for event in stream.events(request.is_disconnected):
        ...
    # leaving the loop early (client gone, generator closed or cancelled) aborts the request

Admission is decided in `submit`, before any response header is sent: the samples a model
holds (running or queued, from submit until their last event is back on the loop) never pass
the engine's max_waiting, so the engine's own queue check cannot fail a request after it
was accepted; past that, QueueFullError (503 + Retry-After).

Time to first token and inter-token latency are measured here, as events reach the loop; for
a whole (non-streamed) answer, as they leave the engine, whose events cross to the loop only
when a sample ends (nothing reads them sooner; the client's disconnect is still polled).
The model is released (its keep-alive clock restarts) once every sample has finished or the
request was aborted, whichever comes first, exactly once.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from quant.errors import QueueFullError
from runtime.engine.engine import Event
from runtime.sampling_params import SamplingParams
from runtime.server.metrics import ServerMetrics
from runtime.server.models import ModelRegistry, ServedModel

POLL_SECONDS = 0.5  # how often an idle wait checks whether the client has gone

Disconnected = Callable[[], Awaitable[bool]]


class Mailbox:
    """Events posted from engine threads, delivered on the loop in batches: the first post
    after a delivery schedules the next one; posts until it runs ride along."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[[Event], None], Event]] = []

    def post(self, arrive: Callable[[Event], None], event: Event) -> None:
        with self._lock:
            self._items.append((arrive, event))
            if len(self._items) > 1:
                return  # a delivery is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for arrive, event in items:
            arrive(event)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
    weakref.WeakKeyDictionary()
)


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def finished(event: Event) -> bool:
    return event.error is not None or (
        event.delta is not None and event.delta.finish_reason is not None
    )


class RequestStream:
    def __init__(
        self,
        registry: ModelRegistry,
        served: ServedModel,
        metrics: ServerMetrics,
        arrived: float,
        whole: bool = False,
    ) -> None:
        self.registry, self.served, self.metrics = registry, served, metrics
        self.arrived = arrived  # time.perf_counter() when the request came in
        # A whole (non-streamed) answer: nothing reads a token before a sample's last, so its
        # events wait on the engine thread and cross to the loop when the sample ends.
        self.whole = whole
        self._held: list[Event] = []
        self.request_id: str | None = None
        self.prompt_tokens = 0
        self.samples = 0  # the request's n
        self._mailbox = mailbox(asyncio.get_running_loop())
        # Events on the loop not yet taken, and the consumer's wake-up while it waits: a plain
        # deque and one future (no asyncio.Queue, no wait_for task per token).
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._unfinished = 0  # samples whose last event has not reached the loop
        self._unconsumed = 0  # samples whose last event the consumer has not taken
        self._first_token = True
        self._last_token: dict[int, float] = {}
        self._released = False
        self._admitted = 0  # samples counted in served.admitted until their last event
        self._next_poll = time.monotonic() + POLL_SECONDS

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> None:
        served, limit = self.served, self.served.engine.options.max_waiting
        try:
            if served.admitted + params.n > limit:
                raise QueueFullError(
                    f"{limit} requests are already running or waiting for "
                    f"{served.name}; retry shortly"
                )
            handle = served.engine.submit(prompt_ids, params, self._sink)
        except BaseException:
            self._release()
            raise
        served.admitted += params.n
        self._admitted = params.n
        self.request_id, self.prompt_tokens = handle.request_id, handle.prompt_tokens
        self.samples = self._unfinished = self._unconsumed = params.n

    def _sink(self, event: Event) -> None:
        """Called on the engine thread. A whole answer's events are measured here and held
        until their sample ends: the loop wakes once per sample, not once per token."""
        if not self.whole:
            self._mailbox.post(self._arrive, event)
            return
        self._measure(event)
        self._held.append(event)
        if finished(event):
            held, self._held = self._held, []
            for e in held:
                self._mailbox.post(self._take, e)

    def _arrive(self, event: Event) -> None:
        """On the loop: measure, then take the event."""
        self._measure(event)
        self._take(event)

    def _measure(self, event: Event) -> None:
        """Time to first token and inter-token latency, as events reach the loop (a whole
        answer's: as they leave the engine). The histograms lock: either thread may observe."""
        if event.delta is not None and event.delta.token_id is not None:
            now = time.perf_counter()
            if self._first_token:
                self._first_token = False
                self.metrics.ttft.observe(now - self.arrived)
            last = self._last_token.get(event.index)
            if last is not None:
                self.metrics.itl.observe(now - last)
            self._last_token[event.index] = now

    def _take(self, event: Event) -> None:
        """On the loop: queue the event; release the model after the last sample."""
        self._events.append(event)
        _wake(self._waiter)
        if finished(event):
            self._unfinished -= 1
            if self._admitted:
                self._admitted -= 1
                self.served.admitted -= 1
            if self._unfinished == 0:
                self._release()

    async def events(self, disconnected: Disconnected | None = None) -> AsyncIterator[Event]:
        """Every event of the request; ends early (aborting it) if `disconnected` says so."""
        try:
            while self._unconsumed:
                event = await self._next(disconnected)
                if event is None:
                    return
                if finished(event):
                    self._unconsumed -= 1
                yield event
        finally:
            self.close()

    async def _next(self, disconnected: Disconnected | None) -> Event | None:
        """The next event, or None once `disconnected` says the client has gone (asked at
        most every POLL_SECONDS, whether or not events are flowing)."""
        while True:
            now = time.monotonic()
            if disconnected is not None and now >= self._next_poll:
                self._next_poll = now + POLL_SECONDS
                if await disconnected():
                    return None
            if self._events:
                return self._events.popleft()
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(POLL_SECONDS, _wake, waiter)
            try:
                await waiter  # an event arrived, or POLL_SECONDS passed
            finally:
                timer.cancel()
                self._waiter = None

    def close(self) -> None:
        """Abort the request unless all its samples were consumed; release the model."""
        if self._unconsumed and self.request_id is not None:
            self._unconsumed = 0
            self.served.engine.abort(self.request_id)
            self.metrics.count_abort()
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.registry.release(self.served)
