"""tool_choice=auto's lazy grammar in the per-token pipeline (runtime/engine/sequence.py):
free until the call's opening, then every token of the call inside the tools' schemas.

Two kinds of logits after a forced prefix (content, then the trigger split over tokens):
random logits (a model at infinite temperature; the tokenizer only) and the real SmolLM2 at
temperature 1.5. With the lazy grammar every call parses and validates against the tool's
parameter schema; the same runs without it do not (so the tests can fail). Before the
trigger the grammar costs nothing: its per-token time is exactly 0.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from loaders.gguf_file import GGUFFile
from loaders.tokenizer import Tokenizer
from runtime.engine.grammar import GrammarMatcher
from runtime.engine.sequence import Delta, Sequence
from runtime.engine.trigger import TriggerMatcher
from runtime.sampling_params import SamplingParams
from runtime.server.tool_calls import HERMES, tool_format
from runtime.server.tool_grammar import lazy_call_grammar

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
PREFIX = "Let me check. <tool_call>\n"  # SmolLM2 splits the trigger: ' <', 'tool', '_', 'call', '>'
N_CTX = 1024


@pytest.fixture(scope="module")
def tok(smollm2_path) -> Tokenizer:
    with GGUFFile(smollm2_path) as f:
        return Tokenizer.from_metadata(f.metadata)


def _params(tok: Tokenizer, lazy: bool, seed: int, temperature: float) -> SamplingParams:
    grammar = lazy_call_grammar(HERMES, [WEATHER], False, tok, "") if lazy else None
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=80, grammar=grammar)


def _one_hot(token: int, n: int) -> torch.Tensor:
    logits = torch.full((n,), float("-inf"))
    logits[token] = 0.0
    return logits


def _valid_call(text: str) -> bool:
    content, calls = HERMES.parse(text, [WEATHER])
    if content != "Let me check." or len(calls) != 1 or calls[0].name != "get_weather":
        return False
    try:
        jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])
    except jsonschema.ValidationError:
        return False
    return True


def _random_run(tok: Tokenizer, lazy: bool, seed: int) -> tuple[Sequence, str, Delta]:
    seq = Sequence(0, [1], _params(tok, lazy, seed, 1.0), tok, N_CTX)
    forced = tok.encode(PREFIX, add_special=False, parse_special=False)
    noise = torch.Generator().manual_seed(seed)
    text = ""
    while True:
        logits = (
            _one_hot(forced.pop(0), tok.vocab_size)
            if forced
            else torch.randn(tok.vocab_size, generator=noise) * 4
        )
        delta = seq.next(logits)
        text += delta.text
        if delta.finish_reason:
            return seq, text, delta


def test_the_trigger_is_split_over_tokens_in_the_prefix(tok):
    pieces = [tok.piece(i) for i in tok.encode(PREFIX, add_special=False, parse_special=False)]
    assert b"<tool_call>" not in pieces  # so the matcher must join them


@pytest.mark.parametrize("seed", range(6))
def test_random_logits_after_the_trigger_still_make_a_valid_call(tok, seed):
    seq, text, last = _random_run(tok, True, seed)
    assert last.finish_reason == "stop" and _valid_call(text), text
    t = last.timings
    assert t is not None and t.grammar_started_at is not None and not t.grammar_dropped
    # the trigger completes in the prefix's '>' token: nothing before it cost any grammar time
    before = t.grammar_token_seconds[: t.grammar_started_at]
    assert before == [0.0] * len(before) and len(before) >= 5
    after = t.grammar_token_seconds[t.grammar_started_at :]
    assert len(after) == len(t.grammar_token_seconds) - len(before) and all(s > 0 for s in after)


def test_random_logits_without_the_lazy_grammar_make_no_valid_call(tok):
    assert not any(_valid_call(_random_run(tok, False, seed)[1]) for seed in range(6))


def test_no_trigger_no_grammar_cost(tok):
    seq = Sequence(0, [1], _params(tok, True, 0, 1.0), tok, N_CTX)
    noise = torch.Generator().manual_seed(0)
    for _ in range(20):
        delta = seq.next(torch.randn(tok.vocab_size, generator=noise))
        if delta.finish_reason:
            break
    assert seq.timings.grammar_started_at is None
    assert seq.timings.grammar_token_seconds == [0.0] * len(seq.timings.grammar_token_seconds)


# ---- the real model, hot -----------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from runtime.loaded_model import LoadedModel

    return LoadedModel.load(smollm2_path)


def _model_run(lm, lazy: bool, seed: int) -> str:
    from reference_model import KVCache, forward

    from runtime.server.tool_request import render_inputs

    messages, _, _ = render_inputs(
        None, [{"role": "user", "content": "What is the weather in Paris?"}], _request()
    )
    prompt = lm.chat_prompt_ids(messages)
    seq = Sequence(0, prompt, _params(lm.tokenizer, lazy, seed, 1.5), lm.tokenizer, N_CTX)
    forced = lm.tokenizer.encode(PREFIX, add_special=False, parse_special=False)
    cache = KVCache(lm.config, N_CTX)
    text = ""
    with torch.inference_mode():
        logits = forward(lm.model, torch.tensor(prompt), 0, cache)[-1]
        while True:
            if forced:
                logits = _one_hot(forced.pop(0), logits.numel())
            delta = seq.next(logits)
            text += delta.text
            if delta.finish_reason:
                return text
            step = torch.tensor([delta.token_id])
            logits = forward(lm.model, step, len(seq.token_ids) - 1, cache)[-1]


def _request():
    from runtime.server.tool_request import parse_tools

    return parse_tools([WEATHER], "auto", False)


def test_smollm2_hot_after_the_trigger_calls_validly_only_with_the_lazy_grammar(smollm2):
    seeds = range(6)
    with_grammar = [_model_run(smollm2, True, s) for s in seeds]
    assert all(_valid_call(t) for t in with_grammar), with_grammar
    without = [_model_run(smollm2, False, s) for s in seeds]
    assert not all(_valid_call(t) for t in without), without


# ---- the grammars against llama.cpp's real templates -------------------------------------
# a template of each family that has a lazy grammar → its call's end marker
FAMILY_TEMPLATES = {
    "Qwen-Qwen2.5-7B-Instruct": "<|im_end|>",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "<|im_end|>",
    "ibm-granite-granite-4.0": "<|end_of_text|>",
    "meta-llama-Llama-3.1-8B-Instruct": "<|eot_id|>",
    "meta-llama-Llama-3.3-70B-Instruct": "<|eot_id|>",
    "mistralai-Mistral-Nemo-Instruct-2407": "</s>",
    "unsloth-mistral-Devstral-Small-2507": "</s>",
    "Mistral-Small-3.2-24B-Instruct-2506": "</s>",
    "mistralai-Ministral-3-14B-Reasoning-2512": "</s>",
    "openai-gpt-oss-120b": "<|call|>",
    "llm-jp-llm-jp-4.1-8b-thinking": "<|call|>",
}


def _grammar_takes(tok: Tokenizer, source: str, text: str) -> bool | None:
    """Whether the family's lazy grammar, started at the trigger in `text` (pushed token by
    token), takes the rest and may end there; None: no trigger."""
    from test_tool_calls import TOOLS

    lazy = lazy_call_grammar(tool_format(source), TOOLS, True, tok, source)
    assert lazy is not None
    watch = TriggerMatcher(lazy.triggers, lazy.tokens)
    ids = tok.encode(text, add_special=False, parse_special=False)
    pushed = 0
    while watch.fired_at is None and pushed < len(ids):
        watch.push(ids[pushed], tok.decode([ids[pushed]], skip_special=False))
        pushed += 1
    if watch.fired_at is None:
        return None
    m = GrammarMatcher(tok, lazy.grammar)
    tail = tok.decode(ids, skip_special=False)[watch.fired_at :]
    for t in tok.encode(tail, add_special=False, parse_special=True):
        if not m.accepts(t):
            return False
        m.advance(t)
    return m.done or m.accepts(min(tok.eog_ids))  # complete, or may end here


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_each_family_s_lazy_grammar_takes_its_template_s_call(tok, name):
    from test_tool_calls import TEMPLATES, _assistant_text

    if not TEMPLATES.is_dir():
        pytest.skip(f"llama.cpp's templates are not at {TEMPLATES}")
    source = (TEMPLATES / f"{name}.jinja").read_text()
    call = (
        _assistant_text(source)
        .split(FAMILY_TEMPLATES[name])[0]
        .removeprefix("<think>\n\n</think>\n\n")
    )
    assert _grammar_takes(tok, source, "Sure. " * ("{" not in call[:1]) + call) is True
    assert _grammar_takes(tok, source, call.replace('"days": 3', '"days": "3"')) is False


def test_harmony_s_lazy_grammar_takes_the_header_as_gpt_oss_generates_it(tok):
    from test_tool_calls import TEMPLATES

    if not TEMPLATES.is_dir():
        pytest.skip(f"llama.cpp's templates are not at {TEMPLATES}")
    source = (TEMPLATES / "openai-gpt-oss-120b.jinja").read_text()
    call = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
    assert (
        _grammar_takes(
            tok, source, "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant" + call
        )
        is True
    )
    assert _grammar_takes(tok, source, call.replace("get_weather", "get_time")) is False
