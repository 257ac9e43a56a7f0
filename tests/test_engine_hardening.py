"""The engine's error paths and invariants (issues 12 and 13): a failure while sampling one
request fails that request alone, non-finite logits are a typed error, unexpected failures are
InternalError and the engine thread goes on; fair scheduling (a request's n samples or long
prompt cannot starve a newcomer); stop matching that does not slow down with many stops;
per-thread scratch and a thread policy that two engines can enter at once."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
import torch

from quant.errors import (
    InternalError,
    InvalidParameterError,
    NonFiniteLogitsError,
    TooManyStopsError,
)
from runtime.engine.block_manager import BlockManager
from runtime.engine.sampler import Sampler
from runtime.engine.scheduler import Scheduler
from runtime.engine.sequence import Sequence
from runtime.engine.stop import MAX_STOP_CHARS, MAX_STOPS, StopMatcher
from runtime.sampling_params import SamplingParams

# ---- the scheduler: fairness (no model needed) -----------------------------------------


class _Tokenizer:
    eog_ids: frozenset[int] = frozenset()


class _Driver:
    """The engine's side of scheduling without a model: a step's chunks are computed, a
    sequence whose pending tokens are done samples a token (7), and a request with n > 1
    forks its other samples at the first sample, sharing its blocks."""

    def __init__(
        self, max_num_seqs: int, max_step_tokens: int, num_blocks: int = 4096, align: int = 1
    ) -> None:
        self.blocks = BlockManager(num_blocks)
        self.sched = Scheduler(self.blocks, max_num_seqs, max_step_tokens, align)
        self.ids = 0
        self.steps: list[list[tuple[Sequence, int]]] = []
        self.pieces: list[tuple[Sequence, int, int]] = []  # (sequence, computed before, n)

    def add(self, group: str, n_prompt: int, n: int = 1) -> Sequence:
        seq = self._new(group, list(range(1, n_prompt + 1)), n)
        self.sched.add(seq)
        return seq

    def _new(self, group: str, prompt: list[int], n: int) -> Sequence:
        params = SamplingParams(n=n, temperature=0, max_tokens=10_000, ignore_eos=True)
        seq = Sequence(self.ids, prompt, params, _Tokenizer(), 1 << 20)
        seq.group = group
        self.ids += 1
        return seq

    def step(self) -> list[tuple[Sequence, int]]:
        step = self.sched.schedule()
        assert len(step.scheduled) <= self.sched.max_num_seqs
        assert step.num_tokens <= self.sched.max_step_tokens
        for seq, n in step.scheduled:
            self.pieces.append((seq, seq.num_computed, n))
            seq.num_computed += n
            self.blocks.register(seq.seq_id, seq.token_ids, seq.num_computed)
            if seq.pending == 0:
                if not seq.generated and seq.params.n > 1 and seq.params.seed is None:
                    for _ in range(seq.params.n - 1):
                        child = self._new(seq.group, seq.token_ids[: seq.num_prompt], 1)
                        child.num_computed = seq.num_computed
                        child.token_ids.append(7)
                        self.blocks.fork(seq.seq_id, child.seq_id)
                        self.sched.add_running(child)
                seq.token_ids.append(7)
        self.steps.append(step.scheduled)
        return step.scheduled

    def steps_until(self, seq: Sequence, limit: int = 100) -> int:
        """Steps taken until seq has sampled its first token."""
        for k in range(1, limit + 1):
            self.step()
            if seq.generated:
                return k
        return limit + 1


def test_n_samples_do_not_starve_a_newcomer():
    """A request with n=16 on 4 sequences per step: a 4-token request that arrives once the
    16 samples run is scheduled at the next step and decodes every step after it (before:
    it waited until all 16 samples had finished)."""
    d = _Driver(max_num_seqs=4, max_step_tokens=64)
    a = d.add("A", 20, n=16)
    d.step()  # A's prompt, then its 16 samples fork
    assert a.generated and len(d.sched.running) == 16
    b = d.add("B", 4)
    assert d.steps_until(b) == 1
    for _ in range(20):
        scheduled = d.step()
        groups = [s.group for s, _ in scheduled]
        assert "B" in groups and "A" in groups  # each request gets its share, every step
        assert len(scheduled) == 4  # and no slot goes unused
    # the 16 samples take turns: every one of them has moved on
    samples = [s for s in d.sched.running if s.group == "A"]
    assert len(samples) == 16 and min(len(s.generated) for s in samples) >= 3


def test_recurrent_prefills_stop_at_chunk_multiples():
    """align = 32 (a recurrent model): a prefill that does not finish its prompt in a step
    stops at a multiple of 32 positions, whatever shares the step — two long prompts, a
    newcomer, decodes, a budget of 100 — unless the step's room is under one chunk; every
    prompt still completes and the budget is still used."""
    d = _Driver(max_num_seqs=4, max_step_tokens=100, align=32)
    a, b = d.add("A", 700), d.add("B", 333)
    for _ in range(3):
        d.step()
    c = d.add("C", 45)
    for _ in range(40):
        d.step()
    assert all(s.generated for s in (a, b, c))
    prefills = [(s, done, n) for s, done, n in d.pieces if done < s.num_prompt]
    cut = [(done, n) for s, done, n in prefills if done + n < s.num_prompt]
    assert cut and all((done + n) % 32 == 0 for done, n in cut), cut
    assert sum(n for s, _, n in prefills if s is a) == 700
    full = [sum(n for _, n in step) for step in d.steps[:6]]
    assert min(full) >= 100 - 31, full  # at most a chunk's worth left unused


def test_a_long_prompt_does_not_starve_a_newcomer():
    """A 2000-token prompt prefilling under a 64-token budget: a 4-token request that arrives
    behind it is computed at the next step (before: after all 32 chunks), and the step's
    budget is still used in full."""
    d = _Driver(max_num_seqs=4, max_step_tokens=64)
    a = d.add("A", 2000)
    assert d.step() == [(a, 64)]  # alone: the whole budget
    b = d.add("B", 4)
    assert d.steps_until(b) == 1
    assert {s.group: n for s, n in d.steps[-1]} == {"A": 60, "B": 4}
    k = d.steps_until(a)
    assert sum(n for step in d.steps for s, n in step if s is a) == 2000
    assert all(sum(n for _, n in step) == 64 for step in d.steps[:-1]), k


def test_many_prompts_share_each_step():
    """Six long prompts prefilling at once and a seventh arriving: every one is computed in
    every step (budget // requests tokens each at least), the newcomer from the next step."""
    d = _Driver(max_num_seqs=8, max_step_tokens=70)
    seqs = [d.add(f"R{i}", 300) for i in range(6)]
    d.step()
    late = d.add("late", 300)
    for _ in range(5):
        scheduled = dict((s.group, n) for s, n in d.step())
        assert set(scheduled) == {s.group for s in [*seqs, late]}
        assert min(scheduled.values()) >= 70 // 7 and sum(scheduled.values()) == 70


def test_a_block_shortage_preempts_and_never_raises():
    """A pool too small for everyone: shortages are BlockManager return values the scheduler
    turns into preemptions; every sequence keeps moving and the tables stay consistent."""
    d = _Driver(max_num_seqs=4, max_step_tokens=64, num_blocks=12)
    seqs = [d.add(f"R{i}", 40) for i in range(3)]
    for _ in range(200):
        d.step()
        held = [b for t in d.blocks.tables.values() for b in t]
        assert all(d.blocks.ref[b] > 0 for b in held)
        assert d.blocks.num_free + len(set(held)) == 12
    assert d.sched.preemptions_total > 0
    assert all(len(s.generated) > 10 for s in seqs)


# ---- stop strings ------------------------------------------------------------------------


def _per_token_seconds(stops: list[str], pieces: list[str]) -> float:
    m = StopMatcher(stops)
    t = time.perf_counter()
    for piece in pieces:
        m.push(piece)
    return (time.perf_counter() - t) / len(pieces)


def test_many_stop_strings_cost_little_per_token():
    """1000 stop strings of 50 characters: a token costs well under 0.3 ms (before: ~0.7 ms,
    and a million stops made every request on the server 70x slower)."""
    rng = random.Random(0)
    alphabet = "abcdefghij "
    stops = ["".join(rng.choice(alphabet) for _ in range(50)) for _ in range(1000)]
    near = ["a" * 49 + chr(0x41 + i % 26) + str(i) for i in range(1000)]  # one long common start
    pieces = [rng.choice(["a", "aa", " b", "abc", "j", "aaaa"]) for _ in range(300)]
    for s in (stops, near):
        assert _per_token_seconds(s, pieces) < 3e-4


def test_many_stop_strings_match_as_few_do():
    """Cut at the first stop completed (the longest at equal ends), however the text is split,
    with hundreds of stops, against a plain reference."""
    rng = random.Random(1)
    for trial in range(200):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(300)]
        stops = [s for s in stops if rng.random() < 0.02] or ["cab"]
        text = "".join(rng.choice("abcd") for _ in range(40))
        want = text
        for end in range(1, len(text) + 1):
            done = [s for s in stops if text[:end].endswith(s)]
            if done:
                want = text[: end - len(max(done, key=len))]
                break
        m, out, cuts = StopMatcher(stops), [], sorted(rng.sample(range(1, 40), 6))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, 40], strict=True)]
        for piece in pieces:
            emitted, hit = m.push(piece)
            out.append(emitted)
            if hit:
                break
        out.append(m.flush())
        assert "".join(out) == want, (trial, stops, text)


def test_stop_strings_are_capped():
    with pytest.raises(TooManyStopsError):
        StopMatcher(["x"] * (MAX_STOPS + 1))
    with pytest.raises(TooManyStopsError):
        StopMatcher(["x" * (MAX_STOP_CHARS + 1)])
    assert isinstance(TooManyStopsError("m"), InvalidParameterError)  # a 400, not a 500
    StopMatcher([f"stop{i}" for i in range(MAX_STOPS)])


# ---- the sampler ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_are_a_typed_error(temperature, bad):
    logits = torch.randn(100)
    logits[17] = bad
    sampler = Sampler(SamplingParams(temperature=temperature, seed=3))
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
        sampler.sample(logits, [1, 2])
    assert isinstance(NonFiniteLogitsError("m"), InternalError)
    with pytest.raises(NonFiniteLogitsError):  # nothing left to choose from
        sampler.sample(torch.full((100,), -math.inf), [1])


def test_masked_logits_still_sample():
    logits = torch.full((100,), -math.inf)
    logits[5], logits[9] = 1.0, 2.0
    for t in (0.0, 0.8):
        assert Sampler(SamplingParams(temperature=t, seed=1)).sample(logits, []).token_id in (5, 9)


# ---- the engine on a real model -------------------------------------------------------

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
MARK = 424242  # the seed that marks the request a test makes fail


@pytest.fixture(scope="module")
def lm(smollm2_path):
    from runtime.loaded_model import LoadedModel

    return LoadedModel.load(smollm2_path)


@pytest.fixture(scope="module")
def alone(lm):
    """ "The capital of France is", greedy, 8 tokens, on its own."""
    from runtime.engine.llm_engine import EngineOptions, LLMEngine

    engine = LLMEngine(lm, EngineOptions(num_ctx=256))
    out, _ = _run(engine, {"good": (lm.tokenizer.encode("The capital of France is"), GREEDY)})
    return out["good"]


def _run(engine, requests):
    """Add the requests, step to the end; → generated ids per request, errors per request."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    out: dict[str, list[int]] = {}
    errors: dict[str, list[Exception]] = {}
    while engine.has_unfinished:
        for event in engine.step():
            if event.error is not None:
                errors.setdefault(event.request_id, []).append(event.error)
            elif event.delta.token_id is not None:
                out.setdefault(event.request_id, []).append(event.delta.token_id)
    return out, errors


def _poison(monkeypatch, make_error):
    """Sequences of requests seeded MARK fail in sampling with make_error(logits)."""
    original = Sequence.next

    def next_(self, logits):
        if self.params.seed == MARK:
            return original(self, make_error(logits))
        return original(self, logits)

    monkeypatch.setattr(Sequence, "next", next_)


def _raise(err_type, *args):
    """A fresh exception per call: an instance made at collection time would keep, through
    its __traceback__, the frames of the engine step it was raised in (and so the model) for
    the rest of the session."""

    def make(_logits):
        raise err_type(*args)

    return make


@pytest.mark.parametrize(
    "make_logits, error",
    [
        (lambda logits: torch.full_like(logits, math.nan), NonFiniteLogitsError),
        (_raise(RuntimeError, "boom"), InternalError),
        (_raise(KeyError, 18), InternalError),
        (_raise(InvalidParameterError, "bad history"), InvalidParameterError),
    ],
)
@pytest.mark.parametrize("n", [1, 3])
def test_a_failing_sample_fails_its_request_alone(lm, alone, monkeypatch, make_logits, error, n):
    """One of two requests in the same steps fails while sampling (NaN logits at temperature
    0.8, a bug, a typed error): it ends with one error per sample; the other's output is what
    it is alone; every block is freed (before: a KeyError from the error path, the failing
    request never answered and the healthy one got "internal error: 18")."""
    from runtime.engine.llm_engine import EngineOptions, LLMEngine

    _poison(monkeypatch, make_logits)
    engine = LLMEngine(lm, EngineOptions(num_ctx=256))
    bad = SamplingParams(temperature=0.8, seed=MARK, max_tokens=8, n=n)
    ids = lm.tokenizer.encode("The capital of France is")
    out, errors = _run(
        engine, {"bad": (lm.tokenizer.encode("Once upon a time"), bad), "good": (ids, GREEDY)}
    )
    assert out["good"] == alone and "good" not in errors
    assert len(errors["bad"]) == n and all(type(e) is error for e in errors["bad"])
    assert "bad" not in out
    stats = engine.snapshot()
    assert stats.running == stats.waiting == 0 and stats.kv_blocks_used == 0


def test_a_failing_forward_fails_its_step_and_frees_everything(lm, alone, monkeypatch):
    from runtime.engine.llm_engine import EngineOptions, LLMEngine

    engine = LLMEngine(lm, EngineOptions(num_ctx=256))
    ids = lm.tokenizer.encode("The capital of France is")
    run, calls = engine.runner.run, []

    def failing(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("kernel fault")
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", failing)
    out, errors = _run(engine, {"a": (ids, GREEDY), "b": (ids, GREEDY)})
    assert set(errors) == {"a", "b"}
    assert all(
        isinstance(e[0], InternalError) and "kernel fault" in str(e[0]) for e in errors.values()
    )
    assert engine.snapshot().kv_blocks_used == 0
    out, errors = _run(engine, {"c": (ids, GREEDY)})  # and it goes on
    assert out["c"] == alone and not errors


def test_threaded_engine_fails_one_request_and_serves_the_other(lm, alone, monkeypatch):
    """Through the threaded Engine (what the server uses): the failing request's sink gets an
    InternalError, the other one's stream is what it is alone, and the engine thread lives."""
    from runtime.engine.engine import Engine
    from runtime.engine.llm_engine import EngineOptions

    _poison(monkeypatch, _raise(KeyError, 18))
    engine = Engine(lm, EngineOptions(num_ctx=256))
    got: dict[str, list] = {"good": [], "bad": []}
    done = {"good": threading.Event(), "bad": threading.Event()}

    def sink_for(name):
        def sink(event):
            got[name].append(event)
            if event.error is not None or event.delta.finish_reason:
                done[name].set()

        return sink

    try:
        bad = SamplingParams(temperature=0.8, seed=MARK, max_tokens=8)
        engine.submit(lm.tokenizer.encode("Once upon a time"), bad, sink_for("bad"))
        engine.submit(lm.tokenizer.encode("The capital of France is"), GREEDY, sink_for("good"))
        assert done["good"].wait(60) and done["bad"].wait(60)
        assert isinstance(got["bad"][-1].error, InternalError)
        assert all(e.error is None for e in got["good"])
        assert [e.delta.token_id for e in got["good"] if e.delta.token_id is not None] == alone
        assert engine._thread.is_alive()
        deadline = time.time() + 10
        while engine.stats().kv_blocks_used and time.time() < deadline:
            time.sleep(0.05)
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.close()


def test_a_request_the_engine_cannot_add_fails_alone(lm, monkeypatch):
    """A bug while adding a request (not a typed refusal) fails that request with an
    InternalError; the engine thread goes on and the request leaves nothing behind."""
    from runtime.engine import llm_engine
    from runtime.engine.engine import Engine
    from runtime.engine.llm_engine import EngineOptions

    engine = Engine(lm, EngineOptions(num_ctx=256))
    errors, done = [], threading.Event()
    original = llm_engine.LLMEngine._new_sequence

    def new_sequence(self, request, index, params):
        if params.seed == MARK:
            raise RuntimeError("cannot make the sequence")
        return original(self, request, index, params)

    monkeypatch.setattr(llm_engine.LLMEngine, "_new_sequence", new_sequence)

    def sink(event):
        if event.error is not None:
            errors.append(event.error)
        if event.error is not None or event.delta.finish_reason:
            done.set()

    try:
        ids = lm.tokenizer.encode("Hello")
        engine.submit(ids, SamplingParams(seed=MARK, max_tokens=2), sink)
        assert done.wait(30) and isinstance(errors[0], InternalError)
        assert not engine.core.requests
        done.clear()
        engine.submit(ids, SamplingParams(temperature=0, max_tokens=2), sink)
        assert done.wait(60) and len(errors) == 1
    finally:
        engine.close()


# ---- two models at once: scratch and threads ------------------------------------------


def test_forward_threads_from_two_engines_do_not_race(native):
    """Engine 1 enters a forward, engine 2's thread (new) enters while 1 is inside, 1 leaves
    first: 2 keeps the matmul threads (the configured count, recorded before tandem lowered
    torch's), and torch's own ops stay on one thread in both, inside and after (the sampler
    between forwards too: kernels/thread_policy.py)."""
    from kernels.thread_policy import default_threads, forward_threads

    configured = default_threads()
    entered, left, two_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def one():
        with forward_threads():
            entered.set()
            two_done.wait(10)
            seen["one_inside"] = native.get_num_threads()
            seen["one_torch_inside"] = torch.get_num_threads()
        left.set()
        seen["one_torch_after"] = torch.get_num_threads()

    def two():
        entered.wait(10)
        with forward_threads():
            two_done.set()
            left.wait(10)
            seen["two_inside_after_one_left"] = native.get_num_threads()
            seen["two_torch_inside"] = torch.get_num_threads()
        seen["two_torch_after"] = torch.get_num_threads()

    threads = [threading.Thread(target=one), threading.Thread(target=two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {
        "one_inside": configured,
        "one_torch_inside": 1,
        "one_torch_after": 1,
        "two_inside_after_one_left": configured,
        "two_torch_inside": 1,
        "two_torch_after": 1,
    }


def test_forward_threads_takes_the_model_count(native):
    """A model's num_thread goes to the native pool; torch's ops stay on one thread."""
    from kernels.thread_policy import forward_threads

    with forward_threads(3):
        assert native.get_num_threads() == 3 and torch.get_num_threads() == 1
    with forward_threads(1):
        assert native.get_num_threads() == 1


def test_scratch_is_not_shared_between_threads():
    """The torch reference path dequantizes into a scratch buffer: two layers of different
    shapes called from two threads at once give exactly their single-thread results (before:
    one process-wide buffer, overwritten under the other thread's matmul)."""
    from gguf import GGMLQuantizationType as T

    from kernels.linear import PackedLinear
    from quant.quantize import quantize

    gen = torch.Generator().manual_seed(0)
    layers, inputs, want = [], [], []
    for n, k in ((3000, 256), (2500, 512)):
        w = torch.randn(n, k, generator=gen)
        layer = PackedLinear(quantize(w, T.Q8_0), int(T.Q8_0), k, native=False)
        layer.rows_per_chunk = 64  # many chunks per call: many chances to interleave
        x = torch.randn(4, k, generator=gen)
        layers.append(layer)
        inputs.append(x)
        want.append(layer(x))
    bad: list[int] = []
    start = threading.Barrier(2)

    def work(i):
        start.wait()
        for _ in range(30):
            if not torch.equal(layers[i](inputs[i]), want[i]):
                bad.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_two_models_in_two_threads_match_each_alone(lm, gemma3_path):
    """SmolLM2 and Gemma3 served by two threaded Engines at once (the server's layout) give
    the greedy tokens each gives alone."""
    from runtime.engine.engine import Engine
    from runtime.engine.llm_engine import EngineOptions
    from runtime.loaded_model import LoadedModel

    gemma = LoadedModel.load(gemma3_path)
    models = {"smollm2": lm, "gemma3": gemma}
    prompt = "Water boils at"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def generate(names):
        engines = {name: Engine(models[name], EngineOptions(num_ctx=128)) for name in names}
        out = {name: [] for name in names}
        done = {name: threading.Event() for name in names}

        def sink_for(name):
            def sink(event):
                assert event.error is None, event.error
                if event.delta.token_id is not None:
                    out[name].append(event.delta.token_id)
                if event.delta.finish_reason:
                    done[name].set()

            return sink

        try:
            for name, engine in engines.items():
                engine.submit(models[name].tokenizer.encode(prompt), params, sink_for(name))
            assert all(d.wait(120) for d in done.values())
        finally:
            for engine in engines.values():
                engine.close()
        return out

    alone = {**generate(["smollm2"]), **generate(["gemma3"])}
    for _ in range(2):
        assert generate(["smollm2", "gemma3"]) == alone
