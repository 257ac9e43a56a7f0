"""RequestStream without a model: a fake engine whose thread emits events. A streamed request
gets each token on the loop as it comes; a whole one gets them all, in order, only once its
sample ends (one wake-up of the loop, not one per token); both measure TTFT and ITL and
release the model once."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from runtime.engine.engine import Event, RequestHandle
from runtime.engine.sequence import Delta
from runtime.sampling_params import SamplingParams
from runtime.server.metrics import ServerMetrics
from runtime.server.stream import RequestStream


@dataclass
class FakeEngine:
    options: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(max_waiting=8))
    sink: object = None
    aborted: list[str] = field(default_factory=list)

    def submit(self, prompt_ids, params, sink) -> RequestHandle:
        self.sink = sink
        return RequestHandle("req-0", len(prompt_ids))

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class FakeRegistry:
    def __init__(self) -> None:
        self.released = 0

    def release(self, served) -> None:
        self.released += 1


def _events(n: int) -> list[Event]:
    out = [Event("req-0", 0, Delta(i, f"t{i} ")) for i in range(n - 1)]
    return [*out, Event("req-0", 0, Delta(n - 1, "end", finish_reason="length"))]


@pytest.mark.parametrize("whole", [False, True])
def test_every_event_arrives_in_order_and_whole_answers_cross_once(whole: bool) -> None:
    async def main() -> None:
        engine, registry, metrics = FakeEngine(), FakeRegistry(), ServerMetrics()
        served = SimpleNamespace(engine=engine, admitted=0, name="fake")
        loop = asyncio.get_running_loop()
        stream = RequestStream(registry, served, metrics, loop.time(), whole=whole)  # type: ignore[arg-type]
        stream.submit([1, 2, 3], SamplingParams(max_tokens=8))
        events = _events(8)
        seen_before_end: list[int] = []
        got: list[Event] = []

        def engine_thread() -> None:
            for e in events[:-1]:
                engine.sink(e)  # type: ignore[misc]
            # wait until the loop had its chance to take what was posted so far
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result()
            seen_before_end.append(len(got) + len(stream._events))
            engine.sink(events[-1])  # type: ignore[misc]

        worker = threading.Thread(target=engine_thread)
        worker.start()
        async for e in stream.events():
            got.append(e)
        worker.join()
        assert got == events
        # streamed: the tokens were on the loop before the last; whole: none of them were
        assert seen_before_end == [0 if whole else len(events) - 1]
        assert metrics.ttft.count == 1 and metrics.itl.count == len(events) - 1
        assert registry.released == 1 and served.admitted == 0 and not engine.aborted

    asyncio.run(main())


def test_a_waiting_consumer_polls_disconnect_and_aborts() -> None:
    async def main() -> None:
        engine, registry = FakeEngine(), FakeRegistry()
        served = SimpleNamespace(engine=engine, admitted=0, name="fake")
        stream = RequestStream(registry, served, ServerMetrics(), 0.0, whole=True)  # type: ignore[arg-type]
        stream.submit([1], SamplingParams(max_tokens=8))
        asked = 0

        async def gone() -> bool:
            nonlocal asked
            asked += 1
            return asked >= 2  # the second poll (after one POLL_SECONDS wait) says gone

        got = [e async for e in stream.events(gone)]
        assert got == [] and engine.aborted == ["req-0"] and registry.released == 1

    asyncio.run(main())
