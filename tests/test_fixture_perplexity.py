"""Perplexity over ../shared/fixtures/apache-2.0.txt by llama-perplexity's method, against
the figure llama.cpp recorded: within 2%."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FIXTURES, fixture, model_path
from reference_model import KVCache, forward

from runtime.loaded_model import LoadedModel

REL_TOL = 0.02


def perplexity(lm: LoadedModel, text: str, n_ctx: int, n_chunks: int) -> list[float]:
    """Running perplexity after each chunk, as llama-perplexity prints it.

    The text is tokenized whole (BOS per add_bos); each n_ctx chunk is evaluated alone with
    BOS as its first token where the model adds one; the NLL of predicting the second half of
    the chunk's tokens is accumulated; PPL = exp(mean NLL).
    """
    tokens = lm.tokenizer.encode(text, add_special=True)
    nll, count, running = 0.0, 0, []
    for i in range(n_chunks):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        if lm.tokenizer.add_bos:
            chunk[0] = lm.tokenizer.bos_id
        with torch.inference_mode():
            logits = forward(lm.model, torch.tensor(chunk), 0, KVCache(lm.config, n_ctx), True)
        logp = torch.log_softmax(logits.double(), -1)  # (n_ctx, V)
        first = n_ctx // 2
        targets = torch.tensor(chunk[first + 1 :])
        picked = logp[first : n_ctx - 1].gather(1, targets[:, None])
        nll -= picked.sum().item()
        count += len(targets)
        running.append(math.exp(nll / count))
    return running


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3", "qwen_coder"])
def test_perplexity_within_two_percent(name):
    ref = fixture(name)["perplexity"]
    lm = LoadedModel.load(model_path(name))
    text = (FIXTURES / ref["text"]).read_text()
    running = perplexity(lm, text, ref["n_ctx"], len(ref["per_chunk_running"]))
    print(f"{name}: tandem {running} llama.cpp {ref['per_chunk_running']}")
    assert abs(running[-1] - ref["final_ppl"]) / ref["final_ppl"] < REL_TOL
