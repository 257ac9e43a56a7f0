"""The offline LLM API on the real SmolLM2: generate, seeds, n, stop strings, logprobs, chat,
and the errors a caller can cause. Generations are kept short (the CPU path is slow)."""

from __future__ import annotations

import math

import pytest

from quant.errors import (
    ContextLengthError,
    InvalidParameterError,
    ModelNotFoundError,
    TandemError,
)
from runtime import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time"]
GREEDY_TOKENS = 8
IM_START = 1  # SmolLM2's <|im_start|>


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, num_ctx=512)


@pytest.fixture(scope="module")
def greedy(llm):
    """Greedy continuations of both prompts, with the top-3 logprobs of every step."""
    return llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, logprobs=3)
    )


@pytest.fixture(scope="module")
def sampled(llm):
    """16 tokens sampled at temperature 1 with seed 7 (end tokens ignored: always 16)."""
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    return llm.generate("Hello", params)[0].outputs[0]


# -- generate ------------------------------------------------------------------------------


def test_generate_returns_one_output_per_prompt(llm, greedy):
    assert len(greedy) == len(PROMPTS)
    for prompt, req in zip(PROMPTS, greedy, strict=True):
        assert req.prompt == prompt
        assert req.prompt_token_ids == llm.tokenize(prompt)
        assert len(req.outputs) == 1
        out = req.outputs[0]
        assert out.index == 0
        assert len(out.token_ids) == GREEDY_TOKENS
        assert all(isinstance(t, int) and 0 <= t < llm.tokenizer.vocab_size for t in out.token_ids)
        assert out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)
        assert out.text
        assert out.timings is not None
        assert out.timings.prompt_tokens == len(req.prompt_token_ids)
        assert out.timings.eval_tokens == GREEDY_TOKENS
        assert out.timings.prompt_seconds > 0 and out.timings.eval_seconds > 0


def test_greedy_paris(greedy):
    # llama.cpp's greedy continuation of this prompt starts with " Paris" (fixture id 7042)
    assert greedy[0].outputs[0].token_ids[0] == 7042
    assert greedy[0].outputs[0].text.startswith(" Paris")


def test_greedy_is_deterministic(llm, greedy):
    # run again without logprobs and with a stop string that is only ever partly matched
    # (" Paris" is held back as a possible start of " Paris!", then released)
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, stop=[" Paris!"])
    again = llm.generate(PROMPTS[0], params)
    assert len(again) == 1
    out, first = again[0].outputs[0], greedy[0].outputs[0]
    assert out.token_ids == first.token_ids
    assert out.text == first.text == llm.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "length"
    assert out.logprobs is None


def test_logprobs(greedy):
    for req in greedy:
        out = req.outputs[0]
        assert out.logprobs is not None
        assert len(out.logprobs) == len(out.token_ids)
        for token, step in zip(out.token_ids, out.logprobs, strict=True):
            assert token in step
            assert len(step) >= 3
            assert all(isinstance(k, int) for k in step)
            assert all(math.isfinite(v) and v <= 0 for v in step.values())
            # greedy: the chosen token is the most likely one
            assert step[token] == pytest.approx(max(step.values()))
            assert sum(math.exp(v) for v in step.values()) <= 1 + 1e-4


# -- seeds and n ---------------------------------------------------------------------------


def test_same_seed_same_tokens(llm, sampled):
    assert len(sampled.token_ids) == 16
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    again = llm.generate("Hello", params)[0].outputs[0]
    assert again.token_ids == sampled.token_ids
    assert again.text == sampled.text


def test_different_seed_different_tokens(llm, sampled):
    params = SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True)
    other = llm.generate("Hello", params)[0].outputs[0]
    assert len(other.token_ids) == 16
    assert other.token_ids != sampled.token_ids


def test_n_samples(llm):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=4, ignore_eos=True)
    (req,) = llm.generate(["Hello"], params)
    assert req.prompt_token_ids == llm.tokenize("Hello")
    assert [o.index for o in req.outputs] == [0, 1]
    for out in req.outputs:
        assert len(out.token_ids) == 4
        assert out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)


# -- stop strings --------------------------------------------------------------------------


def boundary_stop(llm, token_ids: list[int], text: str) -> tuple[str, int]:
    """A stop string spanning a token boundary (the last char of one token's text and the
    first chars of the next's) whose first occurrence in `text` is at that boundary;
    returns it and where it starts."""
    offset = 0
    for i in range(len(token_ids) - 1):
        offset = len(llm.tokenizer.decode(token_ids[: i + 1]))
        nxt = llm.tokenizer.decode(token_ids[: i + 2])[offset:]
        if offset == 0 or not nxt:
            continue
        stop = text[offset - 1] + nxt[:2]
        if text.find(stop) == offset - 1:
            return stop, offset - 1
    raise AssertionError(f"no usable token boundary in {text!r}")


def test_stop_string_across_token_boundary(llm, greedy):
    first = greedy[0].outputs[0]
    assert first.finish_reason == "length"
    stop, at = boundary_stop(llm, first.token_ids, first.text)
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, stop=[stop])
    out = llm.generate(PROMPTS[0], params)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == first.text[:at]
    assert stop not in out.text
    # generation ended at the token that completed the stop string
    assert out.token_ids == first.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < GREEDY_TOKENS


def test_chat(llm):
    messages = [{"role": "user", "content": "Hi"}]
    req = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4))
    assert req.prompt is None
    assert req.prompt_token_ids[0] == IM_START
    assert req.prompt_token_ids == llm.lm.chat_prompt_ids(messages)
    assert req.prompt_token_ids.count(llm.tokenizer.bos_id) >= 2  # system, user, assistant
    out = req.outputs[0]
    assert out.finish_reason in ("stop", "length")
    assert 1 <= len(out.token_ids) <= 4 or out.finish_reason == "stop"
    assert not set(out.token_ids) & llm.tokenizer.eog_ids  # end tokens are not output
    assert out.text == llm.tokenizer.decode(out.token_ids)


@pytest.mark.parametrize("messages", [[], "Hi", None])
def test_chat_rejects_bad_messages(llm, messages):
    with pytest.raises(InvalidParameterError):
        llm.chat(messages)


# -- errors --------------------------------------------------------------------------------


def test_prompt_longer_than_context(llm):
    prompt = "hello " * 600
    assert len(llm.tokenize(prompt)) > llm.num_ctx
    with pytest.raises(ContextLengthError) as info:
        llm.generate(prompt, SamplingParams(max_tokens=1))
    message = str(info.value)
    assert "shorten the prompt" in message and "num_ctx" in message
    assert "512" in message


def test_chat_longer_than_context(llm):
    with pytest.raises(ContextLengthError):
        llm.chat([{"role": "user", "content": "hello " * 600}], SamplingParams(max_tokens=1))


def test_empty_prompt(llm):
    with pytest.raises(TandemError):
        llm.generate("", SamplingParams(max_tokens=1))


def test_still_works_after_errors(llm, greedy):
    for bad in ("hello " * 600, ""):
        with pytest.raises(TandemError):
            llm.generate(bad, SamplingParams(max_tokens=1))
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=1))[0].outputs[0]
    assert out.token_ids == greedy[0].outputs[0].token_ids[:1]
    assert out.finish_reason == "length"


def test_num_ctx_is_capped_at_training_context(smollm2_path):
    assert LLM(smollm2_path, num_ctx=10**6).num_ctx == 8192


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError) as info:
        LLM("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    assert "smollm2" in message and "gemma3" in message


@pytest.mark.parametrize("ref", ["/nonexistent/x.gguf", "x-missing.gguf", "./nope/model"])
def test_missing_model_file(ref):
    with pytest.raises(ModelNotFoundError):
        LLM(ref)


def test_file_that_is_not_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(TandemError):
        LLM(junk)
