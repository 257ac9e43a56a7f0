"""qwen35's per-sequence recurrent state (runtime/kv/recurrent_state.py) on the synthetic
Qwen3.5 of the conformance fixture (delta nets and gated attention): a sequence batched with
others gets the logits it gets alone, in prefill and in decode; a prompt prefilled in chunks
gets those of one pass; the chunked delta rule is the per-token one; the engine forks, frees and preempts states, keeps prefix caching
off, and a sequence resumed where its state is not fails loudly; the planner counts state,
not KV, for the delta nets; GPU (interpreted Triton) layers agree with the CPU ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script

from kernels import native_loader
from kernels.delta_rule import delta_rule, delta_rule_chunked
from quant.errors import InternalError
from runtime.engine.embedder import Embedder
from runtime.engine.llm_engine import EngineOptions, LLMEngine
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.kv.recurrent_state import state_bytes_per_layer
from runtime.loaded_model import LoadedModel
from runtime.placement.device_map import DeviceMap
from runtime.placement.planner import PlanRequest, kv_per_layer
from runtime.run_options import RunOptions
from runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    not native_loader.available(), reason="the native CPU kernel is not built here"
)
PROMPTS = [[5, 17, 300, 41, 9, 77, 1200], [8, 8, 2048, 3], [600, 12, 44, 45, 46, 47, 48]]


@pytest.fixture(scope="module")
def lm(smollm2_path, tmp_path_factory):
    make = load_script("make_synthetic_gguf")
    fixture = load_script("conformance_fixture")
    entry = make.ARCHITECTURES["qwen35"]
    path = tmp_path_factory.mktemp("qwen35") / "qwen35.gguf"
    make.make_arch(path, entry, make.TYPES[fixture.WEIGHT_TYPE], smollm2_path, entry.dims, 0)
    return LoadedModel.load(path, options=RunOptions.resolve(flags={"num_thread": 2}))


def step(runner: ModelRunner, items: list, seq_ids: list[int]) -> torch.Tensor:
    """items: (ids, start, block) per sequence → each one's last logits (B, V)."""
    batch = ForwardBatch.build([(ids, at, [b], True) for ids, at, b in items], seq_ids)
    with torch.inference_mode():
        return runner.run(batch)


def generate(runner: ModelRunner, prompts: list[list[int]], decodes: int) -> list[torch.Tensor]:
    """All prompts prefilled in one step, then `decodes` batched greedy steps → per step the
    logits (B, V)."""
    seqs = [list(p) for p in prompts]
    ids = list(range(len(seqs)))
    out = [step(runner, [(s, 0, b) for b, s in enumerate(seqs)], ids)]
    for _ in range(decodes):
        for s, row in zip(seqs, out[-1], strict=True):
            s.append(int(row.argmax()))
        out.append(step(runner, [(s[-1:], len(s) - 1, b) for b, s in enumerate(seqs)], ids))
    return out


def test_batched_equals_alone(lm):
    """Mixed prompt lengths prefilled together, then decodes batched: each sequence's logits
    are those it gets alone (the delta nets' states never mix)."""
    batched = generate(ModelRunner(lm.model, len(PROMPTS)), PROMPTS, 4)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(ModelRunner(lm.model, 1), [prompt], 4)
        for got, want in zip(batched, alone, strict=True):
            assert torch.allclose(got[b], want[0], rtol=0, atol=1e-4 * want.abs().max().item())
            assert got[b].argmax() == want[0].argmax()


def test_chunked_prefill_carries_the_state(lm):
    prompt = PROMPTS[0] + PROMPTS[2]
    whole = step(ModelRunner(lm.model, 1), [(prompt, 0, 0)], [0])
    runner = ModelRunner(lm.model, 1)
    step(runner, [(prompt[:5], 0, 0)], [0])
    step(runner, [(prompt[5:11], 5, 0)], [0])
    chunked = step(runner, [(prompt[11:], 11, 0)], [0])
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-4 * whole.abs().max().item())


def test_prefill_cut_at_chunk_multiples_is_exact(lm):
    """A 100-token prompt in one step, and in steps cut at 64 (a multiple of the delta rule's
    chunk of 32 positions, where the scheduler cuts a recurrent model's prefills): the same
    logits bit for bit — the 64 positions in chunks either way, the last 36 as one whole
    chunk and 4 rows either way — so a prompt gets the same answer alone or batched."""
    prompt = [(37 * i + 11) % 3000 + 5 for i in range(100)]
    table = list(range(7))  # KV blocks of 16 positions

    def run(runner: ModelRunner, start: int, end: int) -> torch.Tensor:
        batch = ForwardBatch.build([(prompt[start:end], start, table, True)], [0])
        with torch.inference_mode():
            return runner.run(batch)

    whole = run(ModelRunner(lm.model, len(table)), 0, 100)
    runner = ModelRunner(lm.model, len(table))
    run(runner, 0, 64)
    assert torch.equal(run(runner, 64, 100), whole)


def test_state_is_checked_forked_and_freed(lm):
    runner = ModelRunner(lm.model, 2)
    assert runner.states is not None
    # KV pages only in the 2 attention layers: 2 blocks × 16 slots × (K + V) f16 of 2 × 256
    assert runner.kv_bytes == 2 * 16 * 2 * (2 * 2 * 256 * 2)
    step(runner, [(PROMPTS[1], 0, 0)], [7])
    with pytest.raises(InternalError, match="resumes at position 2"):
        step(runner, [(PROMPTS[1][:1], 2, 0)], [7])  # its state is at position 4
    runner.fork(7, 8)  # the child continues from a copy (over the same KV block here)
    a = step(runner, [([99], 4, 0)], [7])
    b = step(runner, [([99], 4, 0)], [8])
    assert torch.equal(a, b)
    runner.release(7)
    runner.release(8)
    assert runner.states.seqs == {} and runner.states.nbytes() == 0


def test_engine_forks_preempts_and_has_no_prefix_cache(lm):
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    reference = run(LLMEngine(lm, EngineOptions(num_ctx=64)), {"a": PROMPTS[0]}, greedy)
    engine = LLMEngine(lm, EngineOptions(num_ctx=64))
    assert not engine.blocks.prefix_caching
    got = run(engine, {"r": PROMPTS[0]}, SamplingParams(n=2, temperature=0, max_tokens=6))
    assert got[("r", 0)] == got[("r", 1)] == reference[("a", 0)]
    again = run(engine, {"s": PROMPTS[0]}, greedy)  # the same prompt: recomputed, same ids
    assert again[("s", 0)] == reference[("a", 0)]
    assert engine.snapshot().prefix_cache_hits_total == 0
    assert engine.runner.states is not None and engine.runner.states.seqs == {}
    # three sequences growing to 20 tokens (2 blocks each) in a pool of 3 blocks: the newest
    # are preempted and recomputed from position 0, with fresh states
    long = {f"p{i}": (p * 3)[:12] for i, p in enumerate(PROMPTS)}
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tiny = LLMEngine(lm, EngineOptions(num_ctx=32, num_blocks=3, max_num_seqs=3))
    small = run(tiny, long, greedy)
    assert tiny.snapshot().preemptions_total > 0
    assert small == run(LLMEngine(lm, EngineOptions(num_ctx=32)), long, greedy)


def run(engine: LLMEngine, requests: dict[str, list[int]], params: SamplingParams) -> dict:
    for rid, ids in requests.items():
        engine.add_request(rid, ids, params)
    out: dict[tuple[str, int], list[int]] = {}
    while engine.has_unfinished:
        for event in engine.step():
            assert event.error is None, event.error
            if event.delta is not None and event.delta.token_id is not None:
                out.setdefault((event.request_id, event.index), []).append(event.delta.token_id)
    return out


def test_chunked_delta_rule_is_the_recurrence():
    """The chunked prefill form against the per-token recurrence, over several chunks and a
    ragged last one, from a non-zero state: equal to float64 rounding."""
    g = torch.Generator().manual_seed(0)
    b, n, h, d = 2, 150, 4, 32

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    q, k = unit(b, n, h, d), unit(b, n, h, d)
    v = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    decay = -2 * torch.rand(b, n, h, generator=g, dtype=torch.float64)
    beta = torch.rand(b, n, h, generator=g, dtype=torch.float64)
    state = 0.1 * torch.randn(b, h, d, d, generator=g, dtype=torch.float64)
    want = delta_rule(q, k, v, decay, beta, state)
    got = delta_rule_chunked(q, k, v, decay, beta, state, chunk=64)
    for x, y in zip(got, want, strict=True):
        assert torch.allclose(x, y, rtol=0, atol=1e-12)


def test_plan_counts_kv_in_attention_layers_and_state_in_recurrent_ones(lm):
    """16 sequences × 8k context: the 2 attention layers hold KV pages for all of it, the 2
    delta nets a fixed state per sequence (conv window 3 × 1024 and 4 matrices 128 × 128)."""
    request = PlanRequest(num_ctx=8192, num_parallel=16)
    per_layer = kv_per_layer(lm.config, request)
    state = 4 * (3 * 1024 + 4 * 128 * 128)
    assert state_bytes_per_layer(lm.config) == state
    kv = 16 * 8192 * 2 * (2 * 256 * 2)  # slots × (K + V) × Hkv × D × f16
    assert per_layer == [16 * state, kv, 16 * state, kv]


def test_gpu_layers_on_interpreted_triton_agree(lm):
    """The last two layers (a delta net, a gated attention) on the "GPU" path — Triton's
    kernels, in its CPU interpreter here — beside the CPU ones: a prefill of two sequences and
    two batched decodes give the CPU run's greedy tokens, logits within 3% of the largest
    (the CPU kernels quantize activations to 8 bits, Triton's do not; measured 1.3%)."""
    pytest.importorskip("kernels.triton")  # sets TRITON_INTERPRET before triton loads

    def last_two(gguf, config):
        return DeviceMap.last_layers(gguf.tensors.keys(), config.n_layer, 2)

    options = RunOptions.resolve(flags={"num_thread": 2})
    hybrid = LoadedModel.load(lm.gguf.path, last_two, options=options)
    assert [b.triton for b in hybrid.model.layers] == [False, False, True, True]
    prompts = [PROMPTS[0], PROMPTS[1]]
    cpu = torch.stack(generate(ModelRunner(lm.model, 2, graphs=False), prompts, 2))
    gpu = torch.stack(generate(ModelRunner(hybrid.model, 2, graphs=False), prompts, 2)).cpu()
    assert torch.equal(cpu.argmax(-1), gpu.argmax(-1))
    assert (cpu - gpu).abs().max() < 0.03 * cpu.abs().max()


def test_embeddings_run_each_prompt_from_a_fresh_state(lm):
    """The embedder's packed prompts: each one's vector is the one it gets alone."""
    embedder = Embedder(lm)
    together = embedder.embed([PROMPTS[0], PROMPTS[1]])
    alone = embedder.embed([PROMPTS[1]])
    assert torch.allclose(together[1], alone[0], atol=1e-5)
