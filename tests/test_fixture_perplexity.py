"""`tandem perplexity`'s computation (runtime/perplexity.py) over ../shared/fixtures/apache-2.0.txt
against the figures llama-perplexity recorded (same text, same -c 512, same 4 chunks): the
final PPL within 2% and each chunk's running PPL within 3%."""

from __future__ import annotations

import pytest
from conftest import FIXTURES, fixture, model_path

from runtime.loaded_model import LoadedModel
from runtime.perplexity import perplexity

REL_TOL = 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_perplexity_within_two_percent(name):
    ref = fixture(name)["perplexity"]
    lm = LoadedModel.load(model_path(name))
    text = (FIXTURES / ref["text"]).read_text()
    result = perplexity(lm, text, ref["n_ctx"], len(ref["per_chunk_running"]))
    print(f"{name}: tandem {result.running} llama.cpp {ref['per_chunk_running']}")
    assert abs(result.ppl - ref["final_ppl"]) / ref["final_ppl"] < REL_TOL
    for ours, theirs in zip(result.running, ref["per_chunk_running"], strict=True):
        assert abs(ours - theirs) / theirs < 1.5 * REL_TOL
