"""Greedy continuations of the real models against llama.cpp's recorded outputs.

For each fixture prompt tandem generates 24 tokens at temperature 0 and compares them with
llama.cpp's ids. As vLLM compares quantized kernels: the ids must be equal until the first
divergence, and a divergence is accepted only where llama.cpp's own top two candidates were
nearly tied (GAP_TOL); the comparison stops there. On matching steps the logprobs of
llama.cpp's top-5 candidates are compared.

The tolerances are llama.cpp's own noise floor, measured (issue 2's note has the commands):
the same llama.cpp build that recorded the fixtures, run with its other attention kernel
(`llama-server -fa off`, an equally valid computation), diverges from the fixtures at top-2
gaps up to 0.48 and its top-5 logprobs differ from them by 0.094 (SmolLM2) and 0.125
(Gemma3) on average, by up to 0.76. These small models amplify ulp-level differences: ggml
rounds activations to 8 bits before each matmul, and a 1e-6 relative change of a layer's
input moves its output by ~4e-3 through flipped roundings, so a tighter bound would need a
bit-exact reimplementation of ggml's kernels, accumulation order included. Perplexity
(test_fixture_perplexity.py) is the tight aggregate check.
"""

from __future__ import annotations

import pytest
from conftest import fixture, model_path

from runtime import LLM, SamplingParams

GAP_TOL = 0.5  # llama.cpp -fa off vs its fixtures: divergences at gaps up to 0.483
# Qwen2.5-Coder: llama.cpp -fa off itself leaves the fixture on "Water boils at" at step 13,
# where the top-2 gap is 0.656 (measured 2026-12-02, docs/numerics.md); tandem does the same.
GAP_TOLS = {"qwen_coder": 0.7}
# llama.cpp -fa off vs its fixtures: mean |Δ logprob| 0.094 (SmolLM2) / 0.125 (Gemma3);
# tandem's own figures on both kernel paths: docs/numerics.md.
MEAN_TOL = 0.2
# A gross-error guard (a broken layer moves logprobs by whole nats). Low-ranked candidates
# are the noisiest: on Gemma3's "import numpy as np\n" llama.cpp's two attention kernels
# disagree by 0.5 on a -5.4 candidate, and tandem's native path differs by 1.66 there.
WORST_TOL = 2.5


def compare(case: dict, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
    """Steps matched, where and how it diverged, and the top-5 logprob differences."""
    report = {"matched": 0, "diverged_at": None, "gap": None, "diffs": []}
    for step, (ref, ours, lps) in enumerate(zip(case["steps"], token_ids, logprobs, strict=False)):
        top = ref["top"]
        if ours != ref["id"]:
            report.update(diverged_at=step, gap=top[0]["logprob"] - top[1]["logprob"])
            break
        report["diffs"] += [abs(lps.get(c["id"], float("-inf")) - c["logprob"]) for c in top]
        report["matched"] += 1
    return report


@pytest.fixture(scope="module", params=["smollm2", "gemma3", "qwen_coder"])
def reports(request) -> tuple[str, list[dict]]:
    """Every fixture prompt of one model, generated once and compared."""
    name = request.param
    llm = LLM(model_path(name), num_ctx=512)
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=20, ignore_eos=True)
    out = []
    for case in fixture(name)["greedy"]:
        assert llm.tokenize(case["prompt"]) == case["prompt_ids"]
        completion = llm.generate([case["prompt"]], params)[0].outputs[0]
        report = compare(case, completion.token_ids, completion.logprobs)
        report.update(case=case, text=completion.text, ids=completion.token_ids)
        diffs = report["diffs"]
        print(
            f"{name} {case['prompt']!r}: matched {report['matched']}/24, diverged at "
            f"{report['diverged_at']} (gap {report['gap']}), mean |Δ| "
            f"{sum(diffs) / max(len(diffs), 1):.3f}, worst {max(diffs, default=0):.3f}"
        )
        out.append(report)
    return name, out


@pytest.mark.slow
def test_divergences_only_at_near_ties(reports):
    name, rows = reports
    for r in rows:
        if r["diverged_at"] is None:
            assert r["ids"] == r["case"]["completion_ids"]
            assert r["text"] == r["case"]["completion_text"]
        else:
            tol = GAP_TOLS.get(name, GAP_TOL)
            assert r["gap"] < tol, f"{name}: diverged where llama.cpp was sure: {r}"


@pytest.mark.slow
def test_top5_logprobs_within_llama_cpp_noise(reports):
    name, rows = reports
    diffs = [d for r in rows for d in r["diffs"]]
    mean = sum(diffs) / len(diffs)
    matched = sum(r["matched"] for r in rows)
    print(
        f"{name}: {matched}/240 steps matched (llama.cpp -fa off: 171 SmolLM2, 145 Gemma3); "
        f"{len(diffs)} logprobs compared, mean |Δ| {mean:.4f}, worst {max(diffs):.4f}"
    )
    assert mean < MEAN_TOL
    assert max(diffs) < WORST_TOL
