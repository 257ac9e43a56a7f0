"""Greedy continuations of the real models against llama.cpp's recorded outputs.

For each fixture prompt tandem generates 24 tokens at temperature 0 and compares them with
llama.cpp's ids. As vLLM compares quantized kernels: the ids must be equal until the first
divergence, and a divergence is accepted only where llama.cpp's own top two candidates were
nearly tied (GAP_TOL); the comparison stops there. On matching steps the logprobs of
llama.cpp's top-5 candidates must agree within LOGPROB_TOL.
"""

from __future__ import annotations

import pytest
from conftest import fixture, model_path

from runtime import LLM, SamplingParams

# See the closing note of issue 2 for how these were measured (scripts/fixture_report.py).
GAP_TOL = 0.05
LOGPROB_TOL = 0.05
PROMPTS = range(10)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request):
    return request.param, LLM(model_path(request.param), num_ctx=512)


def compare(case: dict, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
    """Steps matched, where and how it diverged, and the worst top-5 logprob difference."""
    report = {"matched": 0, "diverged_at": None, "gap": None, "worst_logprob": 0.0}
    for step, (ref, ours, lps) in enumerate(zip(case["steps"], token_ids, logprobs, strict=False)):
        top = ref["top"]
        if ours != ref["id"]:
            report.update(diverged_at=step, gap=top[0]["logprob"] - top[1]["logprob"])
            break
        for cand in top:
            diff = abs(lps.get(cand["id"], float("-inf")) - cand["logprob"])
            report["worst_logprob"] = max(report["worst_logprob"], diff)
        report["matched"] += 1
    return report


@pytest.mark.slow
@pytest.mark.parametrize("index", PROMPTS)
def test_greedy_matches_llama_cpp(model, index):
    name, llm = model
    case = fixture(name)["greedy"][index]
    assert llm.tokenize(case["prompt"]) == case["prompt_ids"]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=20, ignore_eos=True)
    out = llm.generate([case["prompt"]], params)[0].outputs[0]
    report = compare(case, out.token_ids, out.logprobs)
    print(f"{name} #{index} {case['prompt']!r}: {report}")
    if report["diverged_at"] is None:
        assert out.token_ids == case["completion_ids"]
        assert out.text == case["completion_text"]
    else:
        assert report["gap"] < GAP_TOL, f"diverged where llama.cpp was sure: {report}"
    assert report["worst_logprob"] < LOGPROB_TOL, report
