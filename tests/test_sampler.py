"""SamplingParams validation and ollama mapping; the Sampler's chain, determinism and
distribution."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from quant.errors import InvalidParameterError
from runtime.engine.sampler import Sampler
from runtime.sampling_params import OLLAMA_OPTIONS, SamplingParams

# Probabilities 1/2, 1/4, 1/8, 1/16, 1/16: every truncation below has an exact answer.
HALVES = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]))


def sampler(**kw: object) -> Sampler:
    return Sampler(SamplingParams(**kw))  # type: ignore[arg-type]


def draws(s: Sampler, logits: torch.Tensor, n: int, history: list[int] | None = None) -> list[int]:
    return [s.sample(logits, history or []).token_id for _ in range(n)]


def kept(logits: torch.Tensor, **kw: object) -> set[int]:
    """Ids that survive top_k/top_p/min_p (finite after truncation)."""
    vals, ids = sampler(**kw)._truncate(logits)
    ids = torch.arange(logits.numel()) if ids is None else ids
    return set(ids[torch.isfinite(vals)].tolist())


# ---------------------------------------------------------------- greedy and determinism


def test_greedy_is_argmax() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(1000, generator=g)
        assert sampler(temperature=0).sample(logits, []).token_id == int(logits.argmax())


@pytest.mark.parametrize("temperature", [0.1, 1.0, 3.0, 100.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature: float) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(500, generator=g)
    s = sampler(top_k=1, temperature=temperature, seed=3)
    assert set(draws(s, logits, 30)) == {int(logits.argmax())}


def test_same_seed_same_sequence_different_seed_differs() -> None:
    logits = torch.zeros(1000)  # uniform: 50 draws of two seeds agree with chance 1000**-50
    a = draws(sampler(seed=42), logits, 50)
    assert a == draws(sampler(seed=42), logits, 50)
    assert a != draws(sampler(seed=43), logits, 50)
    assert len(set(a)) > 30


def test_unseeded_samplers_differ() -> None:
    logits = torch.zeros(1000)
    assert draws(sampler(), logits, 20) != draws(sampler(), logits, 20)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_frequencies_match_softmax(temperature: float) -> None:
    """8,000 seeded draws from 5 tokens; Pearson's chi-square (4 degrees of freedom) must stay
    under 25 (p ~ 5e-5 for a correct sampler; a wrong temperature gives hundreds)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 8_000
    counts = torch.bincount(
        torch.tensor(draws(sampler(temperature=temperature, seed=7), logits, n)), minlength=5
    )
    expected = torch.softmax(logits / temperature, dim=0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (counts.tolist(), expected.tolist(), chi2)


# ---------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.3, {0}), (0.7, {0, 1}), (0.8, {0, 1, 2}), (0.95, {0, 1, 2, 3, 4}), (0.0, {0})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: set[int]) -> None:
    assert kept(HALVES, top_p=top_p) == expected


@pytest.mark.parametrize(
    "min_p, expected", [(0.9, {0}), (0.3, {0, 1}), (0.2, {0, 1, 2}), (0.1, {0, 1, 2, 3, 4})]
)
def test_min_p_keeps_tokens_with_p_at_least_min_p_times_max(
    min_p: float, expected: set[int]
) -> None:
    assert kept(HALVES, min_p=min_p) == expected


def test_top_k_then_top_p_renormalizes_over_top_k() -> None:
    # Over the top 2 the probabilities are 2/3 and 1/3: top_p 0.6 keeps only the first,
    # while over the whole distribution (1/2, 1/4) it keeps both.
    assert kept(HALVES, top_k=2, top_p=0.6) == {0}
    assert kept(HALVES, top_p=0.6) == {0, 1}
    assert kept(HALVES, top_k=3) == {0, 1, 2}


def test_sampling_draws_only_and_all_kept_tokens() -> None:
    # Temperature comes after top_p, so even a very flat temperature cannot revive token 2.
    assert set(draws(sampler(top_p=0.7, temperature=50.0, seed=1), HALVES, 400)) == {0, 1}
    assert set(draws(sampler(min_p=0.2, seed=1), HALVES, 400)) == {0, 1, 2}


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_on_a_large_vocabulary_matches_a_full_sort(top_p: float) -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(50_000, generator=g) * 2.0
    logits[:300] += 8.0 * torch.rand(300, generator=g)
    probs = torch.softmax(logits.double(), dim=0)
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], dim=0) - probs[order]
    expected = set(order[before < top_p].tolist())
    got = kept(logits, top_p=top_p)
    # Float32 vs float64 may disagree on one boundary token at most.
    assert len(got ^ expected) <= 1 and len(got) > 1


# ---------------------------------------------------------------- penalties


def test_penalties_by_hand() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    history = [0, 0, 0, 1, 2, 2]
    s = sampler(repetition_penalty=2.0, frequency_penalty=0.1, presence_penalty=0.5)
    out = s._penalize(logits, history)
    # 0: 2/2 - (0.3 + 0.5); 1: -1*2 - (0.1 + 0.5); 2: 0.5/2 - (0.2 + 0.5); 3 unseen.
    assert torch.allclose(out, torch.tensor([0.2, -2.6, -0.45, 3.0]))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0]))  # input untouched


def test_penalty_window() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0])
    last2 = sampler(presence_penalty=1.0, repeat_last_n=2)._penalize(logits, [0, 1, 2])
    assert last2.tolist() == [1.0, 0.0, 0.0]
    whole = sampler(presence_penalty=1.0, repeat_last_n=-1)._penalize(logits, [0, 1, 2])
    assert whole.tolist() == [0.0, 0.0, 0.0]
    off = sampler(presence_penalty=1.0, repeat_last_n=0)._penalize(logits, [0, 1, 2])
    assert off.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "kw", [dict(repetition_penalty=2.0), dict(frequency_penalty=0.6), dict(presence_penalty=0.6)]
)
def test_each_penalty_changes_the_greedy_choice(kw: dict) -> None:
    logits = torch.tensor([1.5, 1.0, -3.0])
    assert sampler(temperature=0).sample(logits, [0]).token_id == 0
    assert sampler(temperature=0, **kw).sample(logits, [0]).token_id == 1


def test_history_outside_vocabulary_is_refused() -> None:
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        sampler(repetition_penalty=1.1).sample(torch.zeros(4), [1, 4])


def test_logits_must_be_1d() -> None:
    with pytest.raises(InvalidParameterError, match="1-D"):
        sampler().sample(torch.zeros(2, 4), [])


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_distribution() -> None:
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(300, generator=g) * 3
    history = list(range(0, 300, 3))
    s = sampler(logprobs=5, temperature=0.7, top_k=20, repetition_penalty=1.3, seed=4)
    reference = torch.log_softmax(logits, dim=0)
    for _ in range(10):
        r = s.sample(logits, history)
        assert r.logprob == pytest.approx(float(reference[r.token_id]), abs=1e-5)
        assert [i for i, _ in r.top] == torch.topk(logits, 5).indices.tolist()
        assert [lp for _, lp in r.top] == sorted((lp for _, lp in r.top), reverse=True)
        for i, lp in r.top:
            assert lp == pytest.approx(float(reference[i]), abs=1e-5)


def test_no_logprobs_means_empty_top() -> None:
    assert sampler(seed=1).sample(HALVES, []).top == []
    assert sampler(seed=1, logprobs=0).sample(HALVES, []).top == []


# ---------------------------------------------------------------- constrained (optimistic mask)


class FakeGrammar:
    """Allows only `allowed`; counts what the sampler asks of it."""

    def __init__(self, allowed: set[int], blank: frozenset[int] = frozenset()) -> None:
        self.allowed, self.blank = allowed, blank
        self.checks = self.masks = 0

    def accepts(self, token: int) -> bool:
        self.checks += 1
        return token in self.allowed

    def ends_at(self, token: int) -> bool:
        return token in self.blank

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        self.masks += 1
        keep = torch.zeros(logits.numel(), dtype=torch.bool)
        keep[sorted(self.allowed)] = True
        return logits.masked_fill(~keep, float("-inf"))


def test_greedy_constrained_is_the_masked_argmax_and_masks_only_when_refused() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    g = FakeGrammar({2, 4})  # the unmasked argmax (0) is refused
    r = sampler(temperature=0, logprobs=2).sample(logits, [], g)
    assert (r.token_id, g.checks, g.masks) == (2, 1, 1)
    # logprobs stay those of the raw, unmasked distribution
    assert r.logprob == pytest.approx(float(torch.log_softmax(logits, 0)[2]), abs=1e-6)
    assert [i for i, _ in r.top] == [0, 1]
    g = FakeGrammar({0, 3})  # the argmax is allowed: no mask is computed
    r = sampler(temperature=0).sample(logits, [], g)
    assert (r.token_id, g.checks, g.masks) == (0, 1, 0)


def test_a_refused_blank_ends_instead_of_being_redrawn() -> None:
    g = FakeGrammar({1}, blank=frozenset({0}))
    r = sampler(temperature=0).sample(torch.tensor([3.0, 1.0]), [], g)
    assert (r.token_id, r.ends, g.masks) == (0, True, 0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_constrained_frequencies_match_the_masked_softmax(temperature: float) -> None:
    """The optimistic path (draw unmasked, redraw masked only when refused) is rejection
    sampling: 12,000 seeded draws must follow softmax over the allowed tokens only. The refused
    tokens hold most of the mass (the argmax included), so a redraw that reused the first
    draw, skipped the mask or kept a refused token fails by far; chi-square with 3 degrees
    of freedom must stay under 22 (p ~ 7e-5 for a correct sampler)."""
    logits = torch.tensor([3.0, 1.0, 2.5, 0.5, 0.0, -0.5, 2.0])
    allowed = {1, 3, 4, 5}
    g = FakeGrammar(allowed)
    s = sampler(temperature=temperature, seed=11)
    n = 12_000
    got = [s.sample(logits, [], g).token_id for _ in range(n)]
    assert set(got) <= allowed
    counts = torch.bincount(torch.tensor(got), minlength=logits.numel()).double()
    masked = FakeGrammar(allowed).mask(logits)
    expected = torch.softmax(masked.double() / temperature, dim=0) * n
    ids = sorted(allowed)
    chi2 = float(((counts[ids] - expected[ids]) ** 2 / expected[ids]).sum())
    assert chi2 < 22.0, (counts[ids].tolist(), expected[ids].tolist(), chi2)
    assert 0 < g.masks < n  # some draws were kept without a mask, others redrawn


# ---------------------------------------------------------------- params


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 129),
        ("n", 1.5),
        ("n", True),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_p", 1.01),
        ("top_p", -0.1),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", 1.5),
        ("min_p", -0.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repeat_last_n", -2),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", "7"),
        ("stop", [""]),
        ("stop", [1]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", "1"),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("ignore_eos", 1),
        ("logprobs", 21),
        ("logprobs", -1),
    ],
)
def test_invalid_parameters_name_field_and_value(field: str, value: object) -> None:
    with pytest.raises(
        InvalidParameterError, match=f"^{field} must be .*got {re.escape(repr(value))}$"
    ):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_valid_parameters_are_normalized() -> None:
    p = SamplingParams(
        temperature=0,
        top_k=-1,
        stop="</s>",
        stop_token_ids=(1, 2),
        seed=0,
        max_tokens=None,
        logprobs=20,
    )
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.stop == ["</s>"] and p.stop_token_ids == [1, 2]


def test_from_options_maps_ollama_names() -> None:
    base = SamplingParams(max_tokens=99, stop=["x"])
    p = SamplingParams.from_options(
        {
            "temperature": 0.2,
            "top_k": 40,
            "top_p": 0.9,
            "min_p": 0.05,
            "repeat_penalty": 1.1,
            "repeat_last_n": 128,
            "presence_penalty": 0.3,
            "frequency_penalty": 0.4,
            "seed": 11,
            "stop": "<end>",
        },
        base,
    )
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.2, 40, 0.9, 0.05)
    assert (p.repetition_penalty, p.repeat_last_n) == (1.1, 128)
    assert (p.presence_penalty, p.frequency_penalty, p.seed) == (0.3, 0.4, 11)
    assert p.stop == ["<end>"] and p.max_tokens == 99
    assert base == SamplingParams(max_tokens=99, stop=["x"])  # base untouched
    assert SamplingParams.from_options({"num_predict": -1}).max_tokens is None
    assert SamplingParams.from_options({"num_predict": 7}).max_tokens == 7
    assert SamplingParams.from_options({"seed": -1}).seed is None
    assert SamplingParams.from_options({}) == SamplingParams()


def test_from_options_unknown_name_lists_known_ones() -> None:
    with pytest.raises(InvalidParameterError, match="'mirostat'.*known options: .*repeat_penalty"):
        SamplingParams.from_options({"mirostat": 2, "temperature": 0.1})


def test_from_options_validates_values() -> None:
    with pytest.raises(InvalidParameterError, match="^repetition_penalty must be"):
        SamplingParams.from_options({"repeat_penalty": -1})


def test_every_ollama_option_maps_to_a_field() -> None:
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(OLLAMA_OPTIONS.values()) <= fields
