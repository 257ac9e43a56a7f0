"""The server's parts that need no model: request parsing (OpenAI and ollama), ollama
options, keep_alive durations, addresses, `tandem ps` formatting, Prometheus rendering."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from quant.errors import ContextLengthError, InvalidParameterError
from runtime.cli.ps import format_table, human_size, processor, until
from runtime.sampling_params import SamplingParams
from runtime.server.address import base_url, parse_address
from runtime.server.errors import RequestFieldError
from runtime.server.keep_alive import parse_keep_alive
from runtime.server.metrics import Histogram
from runtime.server.ollama_options import fit_context, parse_options
from runtime.server.ollama_prompt import parse_chat as parse_ollama_chat
from runtime.server.ollama_prompt import parse_generate
from runtime.server.openai_request import parse_chat, parse_completion

USER = [{"role": "user", "content": "hi"}]


# -- OpenAI bodies ---------------------------------------------------------------------------


def test_chat_fields_map_to_sampling_params():
    req = parse_chat(
        {
            "model": "m",
            "messages": USER,
            "temperature": 0.5,
            "top_p": 0.9,
            "n": 2,
            "stop": "x",
            "seed": 4,
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "logprobs": True,
            "top_logprobs": 3,
            "user": "u",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert req.changes == {
        "temperature": 0.5,
        "top_p": 0.9,
        "n": 2,
        "stop": "x",
        "seed": 4,
        "max_tokens": 7,
        "logprobs": 3,
    }
    assert req.stream and req.include_usage and req.want_logprobs


def test_chat_content_parts_and_developer_role():
    req = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
        }
    )
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"temperature": 3}, "temperature"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream": "yes"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0]"),
        ({"model": ""}, "model"),
    ],
)
def test_chat_refusals_name_the_field(body, param):
    with pytest.raises(RequestFieldError) as info:
        parse_chat({"model": "m", "messages": USER, **body})
    assert info.value.param == param


def test_off_values_are_accepted():
    parse_chat(
        {
            "model": "m",
            "messages": USER,
            "tools": [],
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "logit_bias": {},
            "store": False,
        }
    )
    parse_completion({"model": "m", "prompt": "x", "echo": False, "best_of": 1, "suffix": None})


def test_completion_prompts():
    assert parse_completion({"model": "m", "prompt": "abc"}).prompt == "abc"
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert parse_completion({"model": "m", "prompt": ["abc"]}).prompt == "abc"
    for bad in (["a", "b"], "", [], [1, -2], None):
        with pytest.raises(RequestFieldError):
            parse_completion({"model": "m", "prompt": bad})
    with pytest.raises(RequestFieldError):
        parse_completion({"model": "m", "prompt": "x", "best_of": 3})
    req = parse_completion({"model": "m", "prompt": "x", "logprobs": 0, "max_tokens": 3})
    assert req.changes == {"logprobs": 0, "max_tokens": 3} and req.want_logprobs


def test_bad_sampling_values_name_the_field_after_validation():
    class Model:  # only sampling_defaults is used
        def sampling_defaults(self, base):
            return base

    req = parse_chat({"model": "m", "messages": USER, "top_p": 1.5})
    with pytest.raises(RequestFieldError) as info:
        req.params(Model(), None)
    assert info.value.param == "top_p" and "top_p" in str(info.value)
    params = parse_chat({"model": "m", "messages": USER, "n": 3}).params(Model(), None)
    assert params.n == 3 and params.max_tokens is None


# -- ollama bodies and options ----------------------------------------------------------------


def test_ollama_chat_and_generate_parsing():
    chat = parse_ollama_chat({"model": "m", "messages": USER, "stream": False, "think": False})
    assert not chat.stream and chat.messages == USER and not chat.load_only
    assert parse_ollama_chat({"model": "m"}).load_only
    gen = parse_generate({"model": "m", "prompt": "p", "system": "s"})
    assert gen.stream and gen.messages == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
    ]
    raw = parse_generate({"model": "m", "prompt": "p", "raw": True, "context": [1, 2]})
    assert raw.raw_prompt == "p" and raw.context == [1, 2] and not raw.messages
    assert parse_generate({"model": "m"}).load_only


@pytest.mark.parametrize(
    "body",
    [
        {"format": 5},
        {"images": ["aGk="]},
        {"template": "{{ .Prompt }}"},
        {"suffix": "x"},
        {"think": "maybe"},
        {"use_beam_search": True},
        {"context": [1, "a"]},
        {"raw": 1},
        {"stream": "no"},
    ],
)
def test_ollama_generate_refusals(body):
    with pytest.raises(RequestFieldError):
        parse_generate({"model": "m", "prompt": "p", **body})


def test_ollama_options():
    opts = parse_options(
        {
            "temperature": 0,
            "num_predict": 5,
            "num_ctx": 128,
            "num_thread": 4,
            "mirostat": 0,
            "typical_p": 1.0,
        }
    )
    assert opts.num_ctx == 128 and opts.sampling == {"temperature": 0, "num_predict": 5}
    params = opts.params(SamplingParams())
    assert params.temperature == 0 and params.max_tokens == 5
    assert parse_options({"no_such": 1}).sampling == {}  # ignored, as ollama does
    for bad in (
        {"use_beam_search": True},
        {"mirostat": 2},
        {"typical_p": 0.5},
        {"num_ctx": 0},
        {"num_ctx": "big"},
        [1],
    ):
        with pytest.raises(InvalidParameterError):
            parse_options(bad)
    with pytest.raises(RequestFieldError) as info:
        parse_options({"temperature": -1}).params(SamplingParams())
    assert "temperature" in str(info.value)


def test_fit_context():
    p = SamplingParams(max_tokens=None)
    assert fit_context(p, 10, None, 512) is p
    assert fit_context(p, 10, 100, 512).max_tokens == 90
    assert fit_context(SamplingParams(max_tokens=5), 10, 100, 512).max_tokens == 5
    with pytest.raises(RequestFieldError):
        fit_context(p, 10, 1024, 512)
    with pytest.raises(ContextLengthError):
        fit_context(p, 100, 100, 512)


# -- keep_alive, addresses, ps -------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        (5, 5.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("0", 0.0),
        (0, 0.0),
        ("3600", 3600.0),
        (-1, math.inf),
        ("-1m", math.inf),
    ],
)
def test_keep_alive(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["abc", "5x", "", "1m5", True, None, [], "nan"])
def test_bad_keep_alive(value):
    with pytest.raises(RequestFieldError):
        parse_keep_alive(value)


def test_addresses():
    assert parse_address("") == ("127.0.0.1", 11435)
    assert parse_address("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_address(":9000") == ("127.0.0.1", 9000)
    assert parse_address("http://example:1") == ("example", 1)
    assert parse_address("[::1]:5") == ("::1", 5)
    with pytest.raises(InvalidParameterError):
        parse_address("h:port")
    assert base_url("0.0.0.0", 1) == "http://127.0.0.1:1"
    assert base_url("::1", 2) == "http://[::1]:2"


def test_ps_formatting():
    assert human_size(98_362_432) == "98 MB" and human_size(1_500_000_000) == "1.5 GB"
    assert processor(100, 0) == "100% CPU" and processor(100, 100) == "100% GPU"
    assert processor(100, 60) == "40%/60% CPU/GPU"
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    assert until("2030-01-01T00:04:30Z", now) == "4 minutes from now"
    assert until("2030-01-01T00:00:01.5Z", now) == "1 second from now"
    assert until("9999-12-31T23:59:59Z", now) == "Forever"
    assert until("2029-12-31T00:00:00Z", now) == "Stopping..."
    table = format_table(
        [
            {
                "name": "m",
                "digest": "0123456789abcdef",
                "size": 2_000_000,
                "size_vram": 0,
                "context_length": 512,
                "expires_at": "9999-12-31T23:59:59Z",
            }
        ]
    ).splitlines()
    assert table[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert table[1].split() == ["m", "0123456789ab", "2.0", "MB", "100%", "CPU", "512", "Forever"]


# -- metrics ---------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative():
    h = Histogram("lat_seconds", "latency", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = h.render()
    assert lines[:2] == ["# HELP lat_seconds latency", "# TYPE lat_seconds histogram"]
    assert lines[2:] == [
        'lat_seconds_bucket{le="0.1"} 2',
        'lat_seconds_bucket{le="1.0"} 3',
        'lat_seconds_bucket{le="+Inf"} 4',
        "lat_seconds_sum 3.65",
        "lat_seconds_count 4",
    ]


# -- error mapping ---------------------------------------------------------------------------


def test_errors_map_to_status_and_bodies():
    import json

    from quant.errors import EngineClosedError, ModelNotFoundError, QueueFullError
    from runtime.server.errors import ollama_error, openai_error

    full = openai_error(QueueFullError("512 requests are waiting", retry_after=3))
    assert full.status_code == 503 and full.headers["retry-after"] == "3"
    assert json.loads(full.body)["error"]["type"] == "service_unavailable_error"
    closed = ollama_error(EngineClosedError("shut down"))
    assert closed.status_code == 503 and json.loads(closed.body) == {"error": "shut down"}
    long = json.loads(openai_error(ContextLengthError("too long")).body)["error"]
    assert long == {
        "message": "too long",
        "type": "invalid_request_error",
        "param": None,
        "code": "context_length_exceeded",
    }
    missing = openai_error(ModelNotFoundError("no model 'x'"))
    assert missing.status_code == 404
    assert json.loads(missing.body)["error"]["code"] == "model_not_found"
    field = json.loads(openai_error(RequestFieldError("n", "n must be ...")).body)["error"]
    assert field["param"] == "n" and field["code"] is None
