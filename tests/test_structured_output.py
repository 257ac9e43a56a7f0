"""Constrained decoding on the real SmolLM2: 22 JSON schemas (nested objects, arrays, enums,
anyOf, $ref, bounded numbers, patterns) sampled at temperature 0.8 in one continuously
batched run next to unconstrained requests, every output checked with `jsonschema`; regex,
choice and GBNF grammars; n > 1; stop strings; and schemas llguidance cannot enforce refused
with an error naming the keyword."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from runtime import LLM, SamplingParams
from runtime.engine.grammar import (
    Grammar,
    GrammarError,
    GrammarMatcher,
    check_grammar,
    json_schema,
)

SCHEMAS = json.loads((Path(__file__).parent / "data" / "structured_schemas.json").read_text())
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, num_ctx=512)


def _prompt(llm, schema: dict) -> list[int]:
    ask = f"Reply with JSON matching this schema: {json.dumps(schema)}"
    return llm.lm.chat_prompt_ids([{"role": "user", "content": ask}])


def _run(llm, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, dict[int, tuple]]:
    """Run every request in one batch → {request id: {index: (text, finish_reason)}}."""
    engine, texts, done = llm.engine, {}, {}
    for i, (ids, params) in enumerate(requests):
        engine.add_request(f"r{i}", ids, params)
    while engine.has_unfinished:
        for e in engine.step():
            assert e.error is None, e.error
            key = (e.request_id, e.index)
            texts[key] = texts.get(key, "") + e.delta.text
            if e.delta.finish_reason:
                done.setdefault(e.request_id, {})[e.index] = (texts[key], e.delta.finish_reason)
    return done


def test_22_schemas_at_temperature_08_are_all_valid_next_to_free_requests(llm):
    requests = [
        (
            _prompt(llm, s),
            SamplingParams(
                temperature=0.8, seed=i, max_tokens=MAX_TOKENS, grammar=json_schema(s, "schema")
            ),
        )
        for i, s in enumerate(SCHEMAS)
    ]
    free = llm.lm.chat_prompt_ids([{"role": "user", "content": "Say hi."}])
    requests += [(free, SamplingParams(temperature=0.8, seed=7, max_tokens=12))] * 2
    done = _run(llm, requests)
    for i, schema in enumerate(SCHEMAS):
        text, reason = done[f"r{i}"][0]
        assert reason == "stop", f"schema {i} did not complete in {MAX_TOKENS} tokens: {text!r}"
        jsonschema.validate(json.loads(text), schema)  # raises with the failing path
    for k in (len(SCHEMAS), len(SCHEMAS) + 1):  # unconstrained neighbours ran to their limit
        assert done[f"r{k}"][0][1] in ("stop", "length")


def test_n2_samples_each_follow_the_grammar_and_a_stop_string_still_cuts(llm):
    schema = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}
    ids = _prompt(llm, schema)
    params = SamplingParams(
        n=2, temperature=0.8, seed=3, max_tokens=40, grammar=json_schema(schema, "s")
    )
    done = _run(llm, [(ids, params)])["r0"]
    assert set(done) == {0, 1}
    for text, reason in done.values():
        assert reason == "stop"
        jsonschema.validate(json.loads(text), schema)
    # the stop string `"` ends the output at the first item's opening quote
    params = SamplingParams(
        temperature=0.8, seed=3, max_tokens=40, grammar=json_schema(schema, "s"), stop=['"']
    )
    text, reason = _run(llm, [(ids, params)])["r0"][0]
    assert reason == "stop" and text in ("[", "[]")


@pytest.mark.parametrize(
    "grammar, check",
    [
        (Grammar("regex", "[a-z]{3}-[0-9]{2}"), lambda t: len(t) == 6 and t[3] == "-"),
        (Grammar("choice", json.dumps(["yes", "no"])), lambda t: t in ("yes", "no")),
        (
            Grammar("gbnf", 'root ::= "hi " [a-z]+ "!"'),
            lambda t: t.startswith("hi ") and t[-1] == "!",
        ),
    ],
)
def test_regex_choice_and_gbnf(llm, grammar, check):
    ids = llm.lm.chat_prompt_ids([{"role": "user", "content": "Answer."}])
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=30, grammar=grammar)
    text, reason = _run(llm, [(ids, params)])["r0"][0]
    assert reason == "stop" and check(text), text


@pytest.mark.parametrize(
    "schema, text, ends",
    [
        ({"type": "number"}, "1.2", True),  # complete: the newline ends it, not more digits
        ({"type": "number"}, "1.", False),  # a digit must still follow
        ({"type": "string"}, '"ab', False),  # inside a string
    ],
)
def test_a_refused_newline_ends_the_output_only_where_the_grammar_may_end(llm, schema, text, ends):
    tok = llm.tokenizer
    (newline,) = tok.encode("\n", add_special=False)
    m = GrammarMatcher(tok, json_schema(schema, "s"))
    for t in tok.encode(text, add_special=False):
        m.advance(t)
    assert not m.accepts(newline) and m.ends_at(newline) is ends
    assert not m.ends_at(tok.encode("x", add_special=False)[0])  # only blank tokens


@pytest.mark.parametrize(
    "schema, named",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
    ],
)
def test_unsupported_schema_keywords_are_refused_by_name(llm, schema, named):
    with pytest.raises(GrammarError, match=named):
        check_grammar(llm.tokenizer, json_schema(schema, "response_format"))
