"""Fuzzing the request parsers (issue 13): random JSON-like bodies, biased toward the fields
each API knows, go through the same steps a request does before it reaches a model —
read_json's bounds, parse_chat / parse_completion / parse_generate, ollama options and
keep_alive, SamplingParams — and must come out as a parsed request or a TandemError
(a 4xx), never any other exception (a 500). A fixed number of examples per run keeps CI
time bounded; whatever this finds becomes a test of its own."""

from __future__ import annotations

import dataclasses
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant.errors import TandemError
from runtime.sampling_params import OLLAMA_DEFAULTS
from runtime.server import ollama_prompt, openai_request
from runtime.server.keep_alive import parse_keep_alive
from runtime.server.ollama_options import parse_options
from runtime.server.state import parse_json

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["", "5m", "-1", "1h30m", "user", "system", "text", "auto", "none"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "", None])
parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": json_values}),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles, "content": st.text(max_size=20) | parts | json_values},
        optional={"name": json_values, "images": json_values, "tool_calls": json_values},
    )
    | json_values,
    max_size=4,
)
OPENAI_FIELDS = sorted(openai_request.CHAT_FIELDS | openai_request.COMPLETION_FIELDS)
OLLAMA_FIELDS = sorted(ollama_prompt.CHAT_FIELDS | ollama_prompt.GENERATE_FIELDS)
OPTION_NAMES = ["temperature", "top_k", "top_p", "min_p", "seed", "stop", "num_predict", "num_ctx"]
OPTION_NAMES += [
    "repeat_penalty",
    "repeat_last_n",
    "num_gpu",
    "num_thread",
    "mirostat",
    "typical_p",
]


def _bodies(fields: list[str], model_fields: dict) -> st.SearchStrategy:
    known = st.dictionaries(st.sampled_from(fields), json_values, max_size=6)
    return (
        st.builds(
            lambda base, extra: {**base, **extra},
            st.fixed_dictionaries(model_fields),
            known | st.dictionaries(st.text(max_size=6), json_values, max_size=3),
        )
        | json_values
    )


openai_bodies = _bodies(
    OPENAI_FIELDS,
    {
        "model": st.just("m") | json_values,
        "messages": messages,
        "prompt": st.text(max_size=20) | st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
    },
)
ollama_bodies = _bodies(
    OLLAMA_FIELDS,
    {
        "model": st.just("m") | json_values,
        "messages": messages,
        "prompt": st.text(max_size=20) | json_values,
        "options": st.dictionaries(st.sampled_from(OPTION_NAMES), json_values, max_size=4)
        | json_values,
        "keep_alive": json_values,
        "context": st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
    },
)


class _Model:
    """What OpenAIRequest.params needs of a loaded model."""

    def sampling_defaults(self, base):
        return base


def _openai(parse, body, default_max_tokens) -> None:
    try:
        req = parse(body)
        params = req.params(_Model(), default_max_tokens)
    except TandemError:
        return
    assert params.n >= 1 and (req.messages is not None or req.prompt is not None)


@FUZZ
@given(openai_bodies)
def test_openai_chat_bodies_parse_or_give_a_tandem_error(body):
    _openai(openai_request.parse_chat, body, None)


@FUZZ
@given(openai_bodies)
def test_openai_completion_bodies_parse_or_give_a_tandem_error(body):
    _openai(openai_request.parse_completion, body, 16)


def _ollama(parse, body) -> None:
    try:
        req = parse(body)
        options = parse_options(body.get("options"))
        options.params(OLLAMA_DEFAULTS)
        if body.get("keep_alive") is not None:
            seconds = parse_keep_alive(body["keep_alive"])
            assert seconds >= 0 and not math.isnan(seconds)
    except TandemError:
        return
    assert isinstance(req.model, str) and req.model
    assert all(isinstance(m["content"], str) for m in req.messages)
    assert req.size()[0] >= 0


@FUZZ
@given(ollama_bodies)
def test_ollama_chat_bodies_parse_or_give_a_tandem_error(body):
    _ollama(ollama_prompt.parse_chat, body)


@FUZZ
@given(ollama_bodies)
def test_ollama_generate_bodies_parse_or_give_a_tandem_error(body):
    _ollama(ollama_prompt.parse_generate, body)


def _mangle(text: str, cut: int, junk: str) -> str:
    cut = min(cut, len(text))
    return text[:cut] + junk + text[cut:]


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(lambda v: json.dumps(v).encode(), json_values),
        st.builds(
            lambda v, cut, junk: _mangle(json.dumps(v), cut, junk).encode(),
            json_values,
            st.integers(0, 200),
            st.sampled_from(["[", "]", "{", "}", ",", ":", '"', "1e400", "NaN", "-", "\\u"]),
        ),
        st.builds(lambda d: b"[" * d + b"]" * d, st.integers(0, 5000)),
    )
)
def test_read_json_gives_bounded_json_or_a_tandem_error(raw):
    try:
        value = parse_json(raw)
    except TandemError:
        return
    # what comes out is finite and re-serializable (no NaN, no Infinity)
    json.dumps(value, allow_nan=False)


def test_the_fuzzers_reach_parsed_requests():
    """The strategies are not all noise: well-formed bodies parse."""
    chat = openai_request.parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert dataclasses.replace(chat.params(_Model(), None)).n == 1
    gen = ollama_prompt.parse_generate({"model": "m", "prompt": "x", "options": {"top_k": 3}})
    assert gen.messages[0]["content"] == "x"
