"""Soak test: N minutes of concurrent mixed requests against a tandem server.

    python scripts/soak.py                          # 30 min, 16 concurrent, starts `tandem serve`
    python scripts/soak.py --minutes 3 --json-out soak.json
    python scripts/soak.py --url http://127.0.0.1:11435 --pid 1234   # a server already running
    python scripts/soak.py --seconds 20 --concurrency 4 --interval 10  # a quick check

Without --url the script starts `tandem serve --model MODEL` on a free loopback port (the
server inherits TANDEM_HOME), waits for /health, and stops it with SIGTERM at the end
(recording whether SIGTERM was obeyed). Each of C workers sends one request at a time, drawn
from the mix (see --help for the scenarios and their default weights; --mix name=weight,...
changes them; weight 0 drops one), each with a client-side deadline (--request-timeout).

Recorded per interval (--interval, default 60 s): requests by outcome (ok, intended
disconnects, 4xx by status, 5xx by status, connection errors, timeouts, "200 then an error in
the stream", truncated streams, malformed 2xx bodies), p50/p99 of whole-request latency for
generation requests, time to first byte and to first token of streams, the server's RSS
(psutil on the server's pid; with --url only when --pid is given) and /health's latency.
At the end: the server's /metrics counters against what the client sent, a drain check
(no running or waiting sequences left), RSS growth after warm-up. A table goes to stdout and
every figure to --json-out. The exit code is 1 when there were 5xx answers, connection
errors, in-stream errors or truncated/malformed answers, a bad body that was not refused with
a 4xx, stuck requests, inconsistent /metrics, or RSS growth above --max-rss-growth; 2 when
the server could not be started or reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import httpx
except ImportError:  # some environments ship the same API as httpx2 (openai's dependency)
    import httpx2 as httpx  # type: ignore[no-redef]

try:
    import psutil
except ImportError:  # RSS is then not measured
    psutil = None

# scenario -> (default weight, what it sends)
SCENARIOS: dict[str, tuple[float, str]] = {
    "chat_stream": (14, "POST /v1/chat/completions, streamed (SSE), sometimes include_usage"),
    "chat": (10, "POST /v1/chat/completions, whole"),
    "completions": (8, "POST /v1/completions, streamed or whole"),
    "ollama_chat_stream": (7, "POST /api/chat, streamed (NDJSON)"),
    "ollama_chat": (5, "POST /api/chat, whole"),
    "ollama_generate_stream": (6, "POST /api/generate, streamed"),
    "ollama_generate": (5, "POST /api/generate, whole"),
    "disconnect": (8, "a stream on any API, closed by the client after 0-4 chunks"),
    "n_many": (5, "OpenAI chat or completions with n=2..4, streamed or whole"),
    "stops_many": (4, "OpenAI chat with 16 stop strings (2xx, or a 4xx cap)"),
    "long_near": (2, "OpenAI chat/completions prompt that nearly fills the context (2xx)"),
    "long_over": (2, "OpenAI chat/completions prompt past the context (4xx)"),
    "bad_malformed": (2, "malformed JSON: truncated, trailing garbage, empty, invalid UTF-8"),
    "bad_types": (3, "wrong types/values: content 5, max_tokens 'ten', NaN, 1e400, ..."),
    "bad_unknown_model": (2, "a model name that is neither stored nor pullable (404)"),
    "bad_content_type": (2, "a valid body as text/plain, multipart, or a form from a page (4xx)"),
    "bad_oversized": (1, "valid JSON bodies of 3 MB (4xx) and --big-body-mb MB (413)"),
    "bad_deep_json": (1, "JSON nested 100000 deep (4xx)"),
}

GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate")
QUESTIONS = (
    "Why is the sky blue?",
    "Name three fruits.",
    "Write a haiku about autumn.",
    "What is 12 times 7?",
    "Give me a tip for learning Python.",
    "Describe a cat in one sentence.",
    "What is the capital of France?",
    "Tell me a short joke.",
    "How do plants make food?",
    "List the days of the week.",
    "What does a compiler do?",
    "Suggest a name for a dog.",
)
SYSTEMS = ("You are a helpful assistant.", "Answer briefly.", "You are a pirate.")
FILLER = "The quick brown fox jumps over the lazy dog near the river bank. "
STOP_WORDS = ("zebra", "\n\n", "END", "###", "Q:", "banana split", "</s>", "qwerty", "7", "!")

# outcome kinds (4xx and 5xx carry their status: "4xx:400", "5xx:500")
OK, DISCONNECTED = "ok", "disconnected"
CONN, TIMEOUT = "conn_error", "timeout"
STREAM_ERROR, TRUNCATED, BAD_RESPONSE = "stream_error", "truncated", "bad_response"
CLIENT_ERROR = "client_error"  # this script failed to send or read (a bug here, not there)
FAILING_KINDS = (CONN, STREAM_ERROR, TRUNCATED, BAD_RESPONSE, CLIENT_ERROR)


def outcome_class(outcome: str) -> str:
    return outcome.split(":", 1)[0]


# --------------------------------------------------------------------------- requests


@dataclass
class Spec:
    """One request to send."""

    scenario: str
    endpoint: str
    body: bytes
    stream: bool = False
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    variant: str = ""
    n: int = 1
    disconnect_after: int | None = None  # chunks to read before closing (disconnect)
    summary: str = ""  # the body, shortened, for reports


@dataclass
class Result:
    scenario: str
    endpoint: str
    variant: str
    stream: bool
    started: float  # seconds since the run began
    finished: float = 0.0
    status: int | None = None
    outcome: str = ""
    latency: float = 0.0
    ttfb: float | None = None  # first body bytes of a stream
    ttft: float | None = None  # first generated text of a stream
    tokens: int | None = None  # completion tokens the server reported
    detail: str = ""
    summary: str = ""


def shorten(value: Any, limit: int = 120) -> Any:
    """A body with long strings and lists cut, for reports."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:40]}...<{len(value)} chars>"
    if isinstance(value, list):
        items = [shorten(v, limit) for v in value[:40]]
        return items + [f"...<{len(value)} items>"] if len(value) > 40 else items
    if isinstance(value, dict):
        return {k: shorten(v, limit) for k, v in value.items()}
    return value


class Mix:
    """Builds request specs; the prompt lengths come from a calibration against the server."""

    def __init__(self, model: str, rng: random.Random, big_body_mb: float) -> None:
        self.model, self.rng = model, rng
        self.num_ctx = 4096
        self.tokens_per_filler = 14.0  # replaced by calibrate()
        self.chat_overhead = 30.0
        self.big_body_mb = big_body_mb
        self._big: dict[float, bytes] = {}
        self._deep: bytes | None = None

    # -- bodies
    def _messages(self) -> list[dict]:
        rng = self.rng
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
        if rng.random() < 0.2:
            msgs += [
                {"role": "user", "content": rng.choice(QUESTIONS)},
                {"role": "assistant", "content": "Sure."},
            ]
        msgs.append({"role": "user", "content": rng.choice(QUESTIONS)})
        return msgs

    def _sampling(self) -> dict:
        rng = self.rng
        out: dict[str, Any] = {"temperature": rng.choice((0.0, 0.7, 1.0))}
        if rng.random() < 0.5:
            out["seed"] = rng.randrange(1 << 30)
        return out

    def openai_chat(self, stream: bool, max_tokens: int, **extra: Any) -> dict:
        body = {"model": self.model, "messages": self._messages(), "max_tokens": max_tokens}
        body.update(self._sampling(), stream=stream, **extra)
        if stream and self.rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
        return body

    def openai_completion(self, stream: bool, max_tokens: int, **extra: Any) -> dict:
        prompt = f"Question: {self.rng.choice(QUESTIONS)}\nAnswer:"
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens}
        body.update(self._sampling(), stream=stream, **extra)
        return body

    def ollama(self, kind: str, stream: bool, max_tokens: int) -> dict:
        body: dict[str, Any] = {"model": self.model, "stream": stream}
        if kind == "chat":
            body["messages"] = self._messages()
        else:
            body["prompt"] = self.rng.choice(QUESTIONS)
        body["options"] = {"num_predict": max_tokens, **self._sampling()}
        return body

    def spec(self, scenario: str, endpoint: str, body: Any, **kw: Any) -> Spec:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        summary = kw.pop("summary", None)
        if summary is None:
            summary = json.dumps(shorten(body)) if not isinstance(body, bytes) else repr(body[:120])
        stream = (
            bool(body.get("stream", endpoint.startswith("/api/")))
            if isinstance(body, dict)
            else False
        )
        return Spec(scenario, endpoint, raw, stream=kw.pop("stream", stream), summary=summary, **kw)

    # -- scenarios
    def make(self, scenario: str) -> Spec:
        if scenario.startswith("bad_"):
            return self.rng.choice(self.bad_specs(scenario))
        return getattr(self, f"_{scenario}")()

    def _tokens(self) -> int:
        return self.rng.randint(8, 40)

    def _chat_stream(self) -> Spec:
        return self.spec(
            "chat_stream", "/v1/chat/completions", self.openai_chat(True, self._tokens())
        )

    def _chat(self) -> Spec:
        return self.spec("chat", "/v1/chat/completions", self.openai_chat(False, self._tokens()))

    def _completions(self) -> Spec:
        body = self.openai_completion(self.rng.random() < 0.5, self._tokens())
        return self.spec("completions", "/v1/completions", body)

    def _ollama_chat_stream(self) -> Spec:
        return self.spec(
            "ollama_chat_stream", "/api/chat", self.ollama("chat", True, self._tokens())
        )

    def _ollama_chat(self) -> Spec:
        return self.spec("ollama_chat", "/api/chat", self.ollama("chat", False, self._tokens()))

    def _ollama_generate_stream(self) -> Spec:
        body = self.ollama("generate", True, self._tokens())
        return self.spec("ollama_generate_stream", "/api/generate", body)

    def _ollama_generate(self) -> Spec:
        body = self.ollama("generate", False, self._tokens())
        return self.spec("ollama_generate", "/api/generate", body)

    def _disconnect(self) -> Spec:
        rng, tokens = self.rng, 200
        endpoint = rng.choice(GENERATION_ENDPOINTS)
        if endpoint == "/v1/chat/completions":
            body = self.openai_chat(True, tokens)
        elif endpoint == "/v1/completions":
            body = self.openai_completion(True, tokens)
        else:
            body = self.ollama("chat" if endpoint == "/api/chat" else "generate", True, tokens)
        after = rng.randint(0, 4)
        return self.spec(
            "disconnect", endpoint, body, disconnect_after=after, variant=f"after {after}"
        )

    def _n_many(self) -> Spec:
        n, stream = self.rng.randint(2, 4), self.rng.random() < 0.5
        if self.rng.random() < 0.7:
            body = self.openai_chat(stream, self.rng.randint(4, 16), n=n)
            return self.spec("n_many", "/v1/chat/completions", body, n=n, variant=f"n={n}")
        body = self.openai_completion(stream, self.rng.randint(4, 16), n=n)
        return self.spec("n_many", "/v1/completions", body, n=n, variant=f"n={n}")

    def _stops_many(self) -> Spec:
        rng = self.rng
        # 16 strings: the server's cap (a longer list is refused with a 400, which is fine)
        stops = [rng.choice(STOP_WORDS) + str(i) for i in range(12)] + list(STOP_WORDS[:4])
        body = self.openai_chat(rng.random() < 0.5, self._tokens(), stop=stops)
        return self.spec("stops_many", "/v1/chat/completions", body, variant="16 stops")

    def _long(self, scenario: str, target_tokens: int) -> Spec:
        units = max(1, int((target_tokens - self.chat_overhead - 8) / self.tokens_per_filler))
        # a random head, so that the prefix cache cannot serve one long prompt from another
        text = f"Document {self.rng.randrange(10**8)}. " + FILLER * units
        max_tokens = 8
        if self.rng.random() < 0.5:
            body: dict[str, Any] = {
                "model": self.model,
                "messages": [{"role": "user", "content": text + "Summarise."}],
                "max_tokens": max_tokens,
                "stream": self.rng.random() < 0.5,
            }
            endpoint = "/v1/chat/completions"
        else:
            body = {"model": self.model, "prompt": text, "max_tokens": max_tokens}
            body["stream"] = self.rng.random() < 0.5
            endpoint = "/v1/completions"
        return self.spec(scenario, endpoint, body, variant=f"~{target_tokens} tokens")

    def _long_near(self) -> Spec:
        return self._long("long_near", self.num_ctx - 8 - 64)

    def _long_over(self) -> Spec:
        return self._long("long_over", self.num_ctx + 256)

    def _endpoint_body(self, endpoint: str) -> dict:
        if endpoint == "/v1/chat/completions":
            return self.openai_chat(False, 4)
        if endpoint == "/v1/completions":
            return self.openai_completion(False, 4)
        return self.ollama("chat" if endpoint == "/api/chat" else "generate", False, 4)

    def bad_specs(self, scenario: str) -> list[Spec]:
        """Every variant of one bad-body scenario (on each endpoint it applies to)."""
        return getattr(self, f"_all_{scenario}")()

    def sweep(self) -> list[Spec]:
        """Every variant of every bad-body scenario once."""
        return [
            spec for name in SCENARIOS if name.startswith("bad_") for spec in self.bad_specs(name)
        ]

    def _all_bad_malformed(self) -> list[Spec]:
        out = []
        for endpoint in GENERATION_ENDPOINTS:
            good = json.dumps(self._endpoint_body(endpoint)).encode()
            variants = {
                "truncated": good[: len(good) // 2],
                "trailing garbage": good + b" }{ garbage",
                "empty": b"",
                "invalid utf-8": good[:-2] + b'"\xff\xfe"}',
                "single quotes": good.replace(b'"', b"'"),
                "bare word": b"hello",
            }
            for name, raw in variants.items():
                out.append(self.spec("bad_malformed", endpoint, raw, variant=name))
        return out

    def _all_bad_types(self) -> list[Spec]:
        # An unknown field or option is not here: it is accepted, ignored and named in
        # X-Tandem-Ignored-Fields, as ollama and vLLM do (runtime/server/lenient.py).
        m = self.model
        msgs = [{"role": "user", "content": "hi"}]
        table: dict[str, list[tuple[str, Any]]] = {
            "/v1/chat/completions": [
                ("content int", {"model": m, "messages": [{"role": "user", "content": 5}]}),
                ("messages str", {"model": m, "messages": "hi"}),
                ("messages empty", {"model": m, "messages": []}),
                ("role bad", {"model": m, "messages": [{"role": "wizard", "content": "hi"}]}),
                ("max_tokens str", {"model": m, "messages": msgs, "max_tokens": "ten"}),
                ("max_tokens negative", {"model": m, "messages": msgs, "max_tokens": -5}),
                ("temperature NaN", {"model": m, "messages": msgs, "temperature": math.nan}),
                ("temperature 1e400", {"model": m, "messages": msgs, "temperature": math.inf}),
                ("n float", {"model": m, "messages": msgs, "n": 1.5}),
                ("n zero", {"model": m, "messages": msgs, "n": 0}),
                ("stream str", {"model": m, "messages": msgs, "stream": "yes"}),
                ("stop int", {"model": m, "messages": msgs, "stop": 7}),
                ("model int", {"model": 7, "messages": msgs}),
                ("model missing", {"messages": msgs}),
                ("body list", [1, 2, 3]),
                ("body string", "hello"),
                ("body null", None),
            ],
            "/v1/completions": [
                ("prompt dict", {"model": m, "prompt": {"a": 1}}),
                ("prompt bad token", {"model": m, "prompt": [1, 2, 10**9]}),
                ("prompt negative token", {"model": m, "prompt": [1, -3]}),
                ("max_tokens float", {"model": m, "prompt": "hi", "max_tokens": 2.5}),
            ],
            "/api/chat": [
                ("content list", {"model": m, "messages": [{"role": "user", "content": [1]}]}),
                ("options list", {"model": m, "messages": msgs, "options": [1]}),
                (
                    "num_predict str",
                    {"model": m, "messages": msgs, "options": {"num_predict": "x"}},
                ),
                ("keep_alive 1e400", {"model": m, "messages": msgs, "keep_alive": math.inf}),
                ("keep_alive word", {"model": m, "messages": msgs, "keep_alive": "soon"}),
                ("model null", {"model": None, "messages": msgs}),
                ("body list", [1, 2]),
            ],
            "/api/generate": [
                ("prompt int", {"model": m, "prompt": 123}),
                ("num_ctx negative", {"model": m, "prompt": "hi", "options": {"num_ctx": -1}}),
                ("stream str", {"model": m, "prompt": "hi", "stream": "no"}),
                ("body string", "hi"),
            ],
        }
        out = []
        for endpoint, variants in table.items():
            for name, body in variants:
                raw = json.dumps(body).encode()  # NaN and Infinity as Python's json writes them
                summary = json.dumps(shorten(body))
                out.append(self.spec("bad_types", endpoint, raw, variant=name, summary=summary))
        return out

    def _all_bad_unknown_model(self) -> list[Spec]:
        out = []
        for endpoint in GENERATION_ENDPOINTS:
            body = self._endpoint_body(endpoint)
            body["model"] = f"soak-no-such-model-{self.rng.randrange(1 << 20):05x}"
            out.append(self.spec("bad_unknown_model", endpoint, body, stream=False))
        return out

    def _all_bad_content_type(self) -> list[Spec]:
        # what a web page can send without a CORS preflight; a form-urlencoded body without
        # an Origin (curl -d) is accepted by design, so the form variants carry one
        variants = (
            ("text/plain", "text/plain", None),
            ("multipart/form-data", "multipart/form-data; boundary=x", None),
            (
                "form from localhost page",
                "application/x-www-form-urlencoded",
                "http://localhost:3000",
            ),
            ("form from foreign page", "application/x-www-form-urlencoded", "http://evil.example"),
        )
        out = []
        for endpoint in GENERATION_ENDPOINTS:
            for name, ctype, origin in variants:
                body = self._endpoint_body(endpoint)
                out.append(
                    self.spec(
                        "bad_content_type",
                        endpoint,
                        body,
                        content_type=ctype,
                        headers={"Origin": origin} if origin else {},
                        variant=name,
                        stream=False,
                    )
                )
        return out

    def _all_bad_oversized(self) -> list[Spec]:
        out = []
        for mb in sorted({3.0, self.big_body_mb}):
            if mb not in self._big:
                words = "lorem ipsum dolor sit amet "
                content = words * (int(mb * 2**20) // len(words) + 1)
                body = {"model": self.model, "messages": [{"role": "user", "content": content}]}
                self._big[mb] = json.dumps(body).encode()
            summary = (
                f'{{"model": "{self.model}", "messages": [{{"role": "user", '
                f'"content": <{mb:.1f} MB of words>}}]}}'
            )
            for e in ("/v1/chat/completions", "/api/chat"):
                out.append(
                    self.spec(
                        "bad_oversized", e, self._big[mb], variant=f"{mb:.1f} MB", summary=summary
                    )
                )
        return out

    def _all_bad_deep_json(self) -> list[Spec]:
        if self._deep is None:
            self._deep = b"[" * 100_000 + b"]" * 100_000
        return [
            self.spec("bad_deep_json", e, self._deep, variant="100000 deep", summary="[[[...]]]")
            for e in GENERATION_ENDPOINTS
        ]


EXPECTED = {
    "disconnect": {DISCONNECTED, OK},
    "stops_many": {OK, "4xx"},
    "long_over": {"4xx"},
}


def expected(scenario: str) -> set[str]:
    if scenario.startswith("bad_"):
        return {"4xx"}
    return EXPECTED.get(scenario, {OK})


# --------------------------------------------------------------------------- sending


def _error_text(raw: bytes) -> str:
    text = raw[:300].decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        obj = json.loads(raw)
        err = obj.get("error")
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    return text[:300]


def _check_whole(spec: Spec, raw: bytes, res: Result) -> None:
    try:
        obj = json.loads(raw)
    except ValueError:
        res.outcome, res.detail = BAD_RESPONSE, f"2xx body is not JSON: {raw[:120]!r}"
        return
    if not isinstance(obj, dict):
        res.outcome, res.detail = BAD_RESPONSE, "2xx body is not an object"
        return
    if spec.endpoint.startswith("/v1/"):
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) != spec.n:
            res.outcome = BAD_RESPONSE
            res.detail = f"expected {spec.n} choices, got {shorten(choices)!r}"[:300]
            return
        usage = obj.get("usage") or {}
        res.tokens = usage.get("completion_tokens")
    else:
        if obj.get("done") is not True:
            res.outcome, res.detail = BAD_RESPONSE, f"ollama reply without done: {shorten(obj)}"
            return
        res.tokens = obj.get("eval_count")
    res.outcome = OK


def _piece_text(endpoint: str, obj: dict) -> str:
    if endpoint.startswith("/v1/"):
        out = ""
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            out += (delta.get("content") or "") + (choice.get("text") or "")
        return out
    if endpoint == "/api/chat":
        return (obj.get("message") or {}).get("content") or ""
    return obj.get("response") or ""


async def _read_stream(resp: Any, spec: Spec, res: Result, t0: float) -> None:
    chunks, done, openai = 0, False, spec.endpoint.startswith("/v1/")
    async for line in resp.aiter_lines():
        now = time.perf_counter() - t0
        if res.ttfb is None:
            res.ttfb = now
        line = line.strip()
        if not line or line.startswith(":"):
            continue
        if openai:
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                continue
        else:
            payload = line
        try:
            obj = json.loads(payload)
        except ValueError:
            res.outcome, res.detail = BAD_RESPONSE, f"stream line is not JSON: {payload[:120]!r}"
            return
        if not isinstance(obj, dict):
            res.outcome, res.detail = (
                BAD_RESPONSE,
                f"stream line is not an object: {payload[:120]!r}",
            )
            return
        if "error" in obj:
            res.outcome, res.detail = STREAM_ERROR, _error_text(payload.encode())
            return
        chunks += 1
        if res.ttft is None and _piece_text(spec.endpoint, obj):
            res.ttft = now
        if openai and isinstance(obj.get("usage"), dict):
            res.tokens = obj["usage"].get("completion_tokens")
        if not openai and obj.get("done") is True:
            done = True
            res.tokens = obj.get("eval_count")
        if spec.disconnect_after is not None and chunks >= spec.disconnect_after and not done:
            res.outcome = DISCONNECTED
            return  # leaving the `async with` closes the connection mid-stream
    res.outcome = OK if done else TRUNCATED
    if not done:
        res.detail = f"stream ended after {chunks} chunks without its final marker"


async def execute(client: Any, base: str, spec: Spec, deadline: float, epoch: float) -> Result:
    t0 = time.perf_counter()
    res = Result(
        spec.scenario, spec.endpoint, spec.variant, spec.stream, t0 - epoch, summary=spec.summary
    )

    async def go() -> None:
        headers = {"Content-Type": spec.content_type, **spec.headers}
        async with client.stream(
            "POST", base + spec.endpoint, content=spec.body, headers=headers
        ) as resp:
            res.status = resp.status_code
            if resp.status_code >= 300:
                raw = await resp.aread()
                kind = "4xx" if resp.status_code < 500 else "5xx"
                res.outcome, res.detail = f"{kind}:{resp.status_code}", _error_text(raw)
            elif spec.stream and spec.disconnect_after == 0:
                res.ttfb = time.perf_counter() - t0
                res.outcome = DISCONNECTED
            elif spec.stream:
                await _read_stream(resp, spec, res, t0)
            else:
                _check_whole(spec, await resp.aread(), res)

    try:
        await asyncio.wait_for(go(), deadline)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        res.outcome, res.detail = TIMEOUT, f"no complete answer within {deadline:.0f} s"
    except httpx.TransportError as err:
        res.outcome, res.detail = CONN, f"{type(err).__name__}: {err}"[:300]
    except Exception as err:  # a client-side surprise is recorded, not fatal
        res.outcome, res.detail = CLIENT_ERROR, f"{type(err).__name__}: {err}"[:300]
    res.finished = time.perf_counter() - epoch
    res.latency = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedServer:
    """`tandem serve` started by this script on a free loopback port."""

    def __init__(self, model: str, port: int, extra: list[str], log_path: Path) -> None:
        exe = shutil.which("tandem")
        head = (
            [exe]
            if exe
            else [
                sys.executable,
                "-c",
                "import sys; from runtime.cli.main import main; sys.exit(main())",
            ]
        )
        self.cmd = head + ["serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        self.cmd += extra
        self.url, self.log_path = f"http://127.0.0.1:{port}", log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        return ""

    async def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"tandem serve exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    resp = await client.get(self.url + "/health")
                    if resp.status_code == 200:
                        return time.monotonic() - t0
                    body = resp.json() if resp.status_code == 503 else {}
                    if isinstance(body, dict) and body.get("status") == "error":
                        raise RuntimeError(f"the server could not load the model: {body}")
                await asyncio.sleep(0.5)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> dict:
        out: dict[str, Any] = {"sigterm_obeyed": None, "exit_seconds": None, "returncode": None}
        if self.proc is None:
            return out
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
                out["sigterm_obeyed"] = True
                out["exit_seconds"] = round(time.monotonic() - t0, 2)
            except subprocess.TimeoutExpired:
                out["sigterm_obeyed"] = False
                self.proc.kill()
                self.proc.wait(10)
        else:
            out["died_during_run"] = True
        out["returncode"] = self.proc.returncode
        if self._log is not None:
            self._log.close()
        return out


def rss_bytes(pid: int) -> int | None:
    if psutil is None:
        return None
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total
    except psutil.Error:
        return None


# --------------------------------------------------------------------------- /metrics


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(name, sorted label pairs): value}."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            head, value = line.rsplit(" ", 1)
            if "{" in head:
                name, rest = head.split("{", 1)
                labels = []
                for part in rest.rstrip("}").split(","):
                    if "=" in part:
                        k, v = part.split("=", 1)
                        labels.append((k.strip(), v.strip().strip('"')))
                key = (name, tuple(sorted(labels)))
            else:
                key = (head, ())
            out[key] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(metrics: dict, name: str, **match: str) -> float | None:
    found = [
        v
        for (n, labels), v in metrics.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    ]
    return sum(found) if found else None


async def fetch_metrics(client: Any, base: str) -> dict | None:
    try:
        resp = await client.get(base + "/metrics", timeout=15.0)
        return parse_metrics(resp.text) if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None


def check_metrics(before: dict | None, after: dict | None, results: list[Result]) -> dict:
    """Server counters (the run's difference) against what the client sent and saw."""
    if before is None or after is None:
        return {"available": False, "consistent": None, "mismatches": ["/metrics unreadable"]}

    def diff(name: str, **match: str) -> float | None:
        a = metric_sum(after, name, **match)
        return None if a is None else a - (metric_sum(before, name, **match) or 0.0)

    client = Counter((r.endpoint, r.status) for r in results if r.status is not None)
    no_status = Counter(r.endpoint for r in results if r.status is None)
    server: Counter = Counter()
    for (name, labels), _ in after.items():
        if name == "tandem_requests_total":
            d = dict(labels)
            value = diff(name, endpoint=d.get("endpoint", ""), status=d.get("status", ""))
            if value:
                server[(d.get("endpoint", ""), int(float(d.get("status", "0"))))] = int(value)
    rows, mismatches = [], []
    for endpoint in GENERATION_ENDPOINTS:
        statuses = sorted(
            {s for e, s in client if e == endpoint} | {s for e, s in server if e == endpoint}
        )
        for status in statuses:
            c, s = client[(endpoint, status)], server[(endpoint, status)]
            rows.append({"endpoint": endpoint, "status": status, "client": c, "server": s})
        c_total = sum(client[(endpoint, s)] for s in statuses)
        s_total = sum(server[(endpoint, s)] for s in statuses)
        slack = no_status[endpoint]  # sent, but no status came back (timeouts, resets)
        if not c_total <= s_total <= c_total + slack:
            mismatches.append(
                f"{endpoint}: the server counted {s_total} requests, the client got a status for "
                f"{c_total} (+{slack} without one)"
            )
        for status in statuses:
            c, s = client[(endpoint, status)], server[(endpoint, status)]
            if s < c:
                mismatches.append(
                    f"{endpoint} {status}: the client got {c}, the server counted only {s}"
                )
            elif s > c + slack:
                mismatches.append(
                    f"{endpoint} {status}: the server counted {s}, the client got {c}"
                )
    disconnects = sum(1 for r in results if r.outcome in (DISCONNECTED, TIMEOUT, TRUNCATED, CONN))
    aborted = diff("tandem_requests_aborted_total")
    if aborted is not None and aborted > disconnects:
        mismatches.append(
            f"tandem_requests_aborted_total rose by {aborted:.0f}, but the client closed only "
            f"{disconnects} requests early"
        )
    seen_tokens = sum(r.tokens or 0 for r in results if r.outcome == OK)
    generated = diff("tandem_generation_tokens_total")
    if generated is not None and generated < seen_tokens:
        mismatches.append(
            f"tandem_generation_tokens_total rose by {generated:.0f}, fewer than the "
            f"{seen_tokens} completion tokens the answers reported"
        )
    return {
        "available": True,
        "consistent": not mismatches,
        "mismatches": mismatches,
        "requests": rows,
        "aborted_server": aborted,
        "client_early_closes": disconnects,
        "generation_tokens_server": generated,
        "completion_tokens_reported": seen_tokens,
        "prompt_tokens_server": diff("tandem_prompt_tokens_total"),
        "preemptions_server": diff("tandem_preemptions_total"),
        "ttft_count_server": diff("tandem_time_to_first_token_seconds_count"),
    }


# --------------------------------------------------------------------------- the run


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def parse_mix(text: str | None) -> dict[str, float]:
    weights = {name: w for name, (w, _) in SCENARIOS.items()}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in SCENARIOS:
            raise SystemExit(f"--mix: unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise SystemExit(f"--mix: {part!r} is not name=weight") from None
    weights = {k: v for k, v in weights.items() if v > 0}
    if not weights:
        raise SystemExit("--mix leaves no scenario with a positive weight")
    return weights


@dataclass
class Run:
    args: argparse.Namespace
    base: str
    pid: int | None
    mix: Mix
    weights: dict[str, float]
    results: list[Result] = field(default_factory=list)
    sweep: list[Spec] = field(default_factory=list)  # sent first, one each
    rss: list[tuple[float, int]] = field(default_factory=list)
    health: list[tuple[float, float | None, str]] = field(default_factory=list)
    epoch: float = 0.0
    duration: float = 0.0


async def calibrate(run: Run, client: Any) -> dict:
    """Tokens per FILLER unit and the chat template's overhead, from usage.prompt_tokens;
    the model's context from /api/ps."""
    out: dict[str, Any] = {}

    async def prompt_tokens(units: int) -> int | None:
        body = {
            "model": run.mix.model,
            "messages": [{"role": "user", "content": FILLER * units + "Summarise."}],
            "max_tokens": 1,
            "temperature": 0,
        }
        try:
            resp = await client.post(
                run.base + "/v1/chat/completions", json=body, timeout=run.args.request_timeout
            )
            if resp.status_code == 200:
                return resp.json()["usage"]["prompt_tokens"]
            out.setdefault("errors", []).append(f"{resp.status_code}: {_error_text(resp.content)}")
        except (httpx.HTTPError, ValueError, KeyError) as err:
            out.setdefault("errors", []).append(f"{type(err).__name__}: {err}")
        return None

    a, b = await prompt_tokens(4), await prompt_tokens(40)
    if a is not None and b is not None and b > a:
        run.mix.tokens_per_filler = (b - a) / 36
        run.mix.chat_overhead = a - 4 * run.mix.tokens_per_filler
    out["calibrated"] = a is not None and b is not None and b > a
    try:
        resp = await client.get(run.base + "/api/ps", timeout=10.0)
        for m in resp.json().get("models", []):
            name = m.get("name", "")
            if name == run.mix.model or name.split(":")[0] == run.mix.model.split(":")[0]:
                if m.get("context_length"):
                    run.mix.num_ctx = int(m["context_length"])
                    out["context_from"] = "/api/ps"
    except (httpx.HTTPError, ValueError, AttributeError) as err:
        out["ps_error"] = str(err)
    if run.args.num_ctx:
        run.mix.num_ctx = run.args.num_ctx
        out["context_from"] = "--num-ctx"
    out.update(
        num_ctx=run.mix.num_ctx,
        tokens_per_filler=round(run.mix.tokens_per_filler, 3),
        chat_overhead=round(run.mix.chat_overhead, 1),
    )
    return out


async def worker(run: Run, client: Any, wid: int, end: float) -> None:
    rng = random.Random(run.args.seed * 1000 + wid)
    names, weights = list(run.weights), list(run.weights.values())
    while time.perf_counter() < end:
        if run.sweep:
            spec = run.sweep.pop()
        else:
            spec = run.mix.make(rng.choices(names, weights)[0])
        run.results.append(
            await execute(client, run.base, spec, run.args.request_timeout, run.epoch)
        )


async def sampler(run: Run, client: Any, end: float) -> None:
    """RSS every 2 s, /health every 5 s, until `end`."""
    next_health = 0.0
    while True:
        now = time.perf_counter()
        if run.pid is not None:
            value = rss_bytes(run.pid)
            if value is not None:
                run.rss.append((now - run.epoch, value))
        if now >= next_health:
            next_health = now + 5.0
            t0 = time.perf_counter()
            try:
                resp = await client.get(run.base + "/health", timeout=10.0)
                run.health.append((t0 - run.epoch, time.perf_counter() - t0, str(resp.status_code)))
            except httpx.HTTPError as err:
                run.health.append((t0 - run.epoch, None, type(err).__name__))
        if now >= end:
            return
        await asyncio.sleep(min(2.0, max(0.05, end - now)))


def interval_rows(run: Run) -> list[dict]:
    step = run.args.interval
    count = max(1, math.ceil(run.duration / step - 1e-9))
    rows = []
    for i in range(count):
        lo, hi = i * step, (i + 1) * step
        last = i == count - 1
        sel = [r for r in run.results if lo <= r.finished < hi or (last and r.finished >= hi)]
        rss = [v for t, v in run.rss if lo <= t < hi or (last and t >= hi)]
        health = [h for h in run.health if lo <= h[0] < hi or (last and h[0] >= hi)]
        rows.append(summarise(sel, lo, hi, rss, health))
    return rows


def summarise(sel: list[Result], lo: float, hi: float, rss: list[int], health: list) -> dict:
    gen_ok = [r for r in sel if r.outcome == OK and not r.scenario.startswith("bad_")]
    streams = [r for r in gen_ok if r.stream]
    h_lat = [h[1] for h in health if h[1] is not None]
    r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {
        "start_s": lo,
        "end_s": hi,
        "requests": len(sel),
        "outcomes": dict(sorted(Counter(r.outcome for r in sel).items())),
        "latency_p50_s": r3(pct([r.latency for r in gen_ok], 50)),
        "latency_p99_s": r3(pct([r.latency for r in gen_ok], 99)),
        "ttfb_p50_s": r3(pct([r.ttfb for r in streams if r.ttfb is not None], 50)),
        "ttfb_p99_s": r3(pct([r.ttfb for r in streams if r.ttfb is not None], 99)),
        "ttft_p50_s": r3(pct([r.ttft for r in streams if r.ttft is not None], 50)),
        "ttft_p99_s": r3(pct([r.ttft for r in streams if r.ttft is not None], 99)),
        "bad_latency_p99_s": r3(pct([r.latency for r in sel if r.scenario.startswith("bad_")], 99)),
        "rss_mb_last": round(rss[-1] / 2**20, 1) if rss else None,
        "rss_mb_max": round(max(rss) / 2**20, 1) if rss else None,
        "health_max_s": r3(max(h_lat) if h_lat else None),
        "health_failures": sum(1 for h in health if h[2] != "200"),
    }


def fmt_outcomes(outcomes: dict) -> tuple[str, ...]:
    c = Counter(outcomes)
    four = " ".join(f"{k[4:]}:{v}" for k, v in sorted(c.items()) if k.startswith("4xx:")) or "-"
    five = " ".join(f"{k[4:]}:{v}" for k, v in sorted(c.items()) if k.startswith("5xx:")) or "-"
    other = c[STREAM_ERROR] + c[TRUNCATED] + c[BAD_RESPONSE] + c[CLIENT_ERROR]
    return (str(c[OK]), str(c[DISCONNECTED]), four, five, str(c[CONN]), str(c[TIMEOUT]), str(other))


HEADER = (
    "t(s)",
    "reqs",
    "ok",
    "disc",
    "4xx",
    "5xx",
    "conn",
    "tmo",
    "strm",
    "p50",
    "p99",
    "ttft50",
    "ttft99",
    "rssMB",
    "health",
)
WIDTHS = (9, 5, 5, 4, 22, 8, 4, 4, 4, 6, 6, 6, 6, 6, 6)


def table_row(row: dict) -> tuple[str, ...]:
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (
        f"{row['start_s']:.0f}-{row['end_s']:.0f}",
        str(row["requests"]),
        *fmt_outcomes(row["outcomes"]),
        f(row["latency_p50_s"]),
        f(row["latency_p99_s"]),
        f(row["ttft_p50_s"]),
        f(row["ttft_p99_s"]),
        "-" if row["rss_mb_max"] is None else f"{row['rss_mb_max']:.0f}",
        f(row["health_max_s"]),
    )


def print_table(rows: list[dict]) -> None:
    cells = [HEADER] + [table_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)), flush=True)


async def live_table(run: Run, end: float) -> None:
    """One row per finished interval while the run goes (the final table follows at the end)."""
    step, shown = run.args.interval, 0
    print("  ".join(h.rjust(w) for h, w in zip(HEADER, WIDTHS, strict=True)), flush=True)
    while True:
        now = time.perf_counter() - run.epoch
        while (shown + 1) * step <= now and (shown + 1) * step <= run.duration + 1e-6:
            lo, hi = shown * step, (shown + 1) * step
            sel = [r for r in run.results if lo <= r.finished < hi]
            rss = [v for t, v in run.rss if lo <= t < hi]
            health = [h for h in run.health if lo <= h[0] < hi]
            cells = table_row(summarise(sel, lo, hi, rss, health))
            print("  ".join(c.rjust(w) for c, w in zip(cells, WIDTHS, strict=True)), flush=True)
            shown += 1
        if time.perf_counter() >= end:
            return
        await asyncio.sleep(1.0)


async def drain(run: Run, client: Any) -> dict:
    """Wait until the server reports no running or waiting sequences."""
    t0 = time.monotonic()
    last: dict[str, Any] = {"running": None, "waiting": None}
    while True:
        metrics = await fetch_metrics(client, run.base)
        if metrics is not None:
            running = metric_sum(metrics, "tandem_running_sequences") or 0.0
            waiting = metric_sum(metrics, "tandem_queue_depth") or 0.0
            last = {"running": int(running), "waiting": int(waiting)}
            if running == 0 and waiting == 0:
                return {"drained": True, "drain_seconds": round(time.monotonic() - t0, 2), **last}
        if time.monotonic() - t0 > run.args.drain_seconds:
            return {"drained": False, "drain_seconds": round(time.monotonic() - t0, 2), **last}
        await asyncio.sleep(0.5)


def rss_growth(run: Run, kv_bytes: float | None) -> dict:
    """RSS at the end of the run against RSS after warm-up. The KV pool is committed lazily
    (torch.empty), so up to its size may still arrive after warm-up on a healthy server: unless
    --no-kv-allowance, the part of the pool that the growth before the baseline cannot have
    touched yet (pool - (baseline - start)) is allowed on top of the threshold."""
    samples = run.rss
    out: dict[str, Any] = {"measured": bool(samples), "threshold": run.args.max_rss_growth}
    if not samples:
        return out
    warm = min(run.args.warmup_seconds, run.duration / 2)
    base = [v for t, v in samples if warm <= t < warm + run.args.interval] or [
        v for t, v in samples if t >= warm
    ]
    tail_from = max(warm, run.duration - run.args.interval)
    tail = [v for t, v in samples if t >= tail_from] or [samples[-1][1]]
    start, baseline, end = samples[0][1], max(base or [samples[0][1]]), max(tail)
    allowance = 0.0
    if run.args.kv_allowance and kv_bytes:
        allowance = max(0.0, kv_bytes - max(0, baseline - start))
    out.update(
        warmup_s=round(warm, 1),
        start_mb=round(start / 2**20, 1),
        baseline_mb=round(baseline / 2**20, 1),
        end_mb=round(end / 2**20, 1),
        peak_mb=round(max(v for _, v in samples) / 2**20, 1),
        raw_growth=round(end / baseline - 1, 4),
        kv_pool_mb=None if kv_bytes is None else round(kv_bytes / 2**20, 1),
        kv_allowance_mb=round(allowance / 2**20, 1),
        growth=round(max(0.0, end - baseline - allowance) / baseline, 4),
    )
    return out


def violations(results: list[Result], limit: int = 60, per_kind: int = 3) -> list[dict]:
    seen: Counter = Counter()
    out = []
    for r in results:
        want = expected(r.scenario)
        if r.outcome in want or outcome_class(r.outcome) in want:
            continue
        key = (r.scenario, r.variant if r.scenario.startswith("bad_") else "", r.outcome)
        seen[key] += 1
        if seen[key] <= per_kind and len(out) < limit:
            out.append(
                {
                    "scenario": r.scenario,
                    "variant": r.variant,
                    "endpoint": r.endpoint,
                    "outcome": r.outcome,
                    "status": r.status,
                    "latency_s": round(r.latency, 3),
                    "at_s": round(r.started, 1),
                    "detail": r.detail,
                    "request": r.summary,
                }
            )
    return out


async def soak(args: argparse.Namespace) -> int:
    managed: ManagedServer | None = None
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()}}
    if args.url:
        base, pid = args.url.rstrip("/"), args.pid
        report["server"] = {"url": base, "pid": pid, "started_by_script": False}
    else:
        port = args.port or free_port()
        log_path = Path(
            args.server_log or tempfile.mkstemp(prefix="tandem-soak-", suffix=".log")[1]
        )
        managed = ManagedServer(args.model, port, args.server_arg or [], log_path)
        managed.start()
        base, pid = managed.url, managed.proc.pid
        report["server"] = {
            "url": base,
            "pid": pid,
            "started_by_script": True,
            "command": managed.cmd,
            "log": str(log_path),
        }
        print(f"starting: {' '.join(managed.cmd)}  (log {log_path})", flush=True)
        try:
            report["server"]["startup_seconds"] = round(
                await managed.wait_ready(args.startup_timeout), 1
            )
        except RuntimeError as err:
            print(f"soak: {err}", file=sys.stderr)
            managed.stop()
            return 2
    try:
        return await _soak(args, base, pid, report, managed)
    finally:
        if managed is not None and managed.proc.poll() is None:
            managed.stop()


async def _soak(
    args: argparse.Namespace,
    base: str,
    pid: int | None,
    report: dict,
    managed: ManagedServer | None,
) -> int:
    weights = parse_mix(args.mix)
    run = Run(args, base, pid, Mix(args.model, random.Random(args.seed), args.big_body_mb), weights)
    run.duration = args.seconds if args.seconds else args.minutes * 60
    limits = httpx.Limits(
        max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8
    )
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        try:
            resp = await client.get(base + "/health", timeout=10.0)
            report["server"]["health_at_start"] = resp.status_code
        except httpx.HTTPError as err:
            print(f"soak: no server answered at {base}: {err}", file=sys.stderr)
            return 2
        report["calibration"] = await calibrate(run, client)
        if args.sweep:
            run.sweep = list(reversed(run.mix.sweep()))
        before = await fetch_metrics(client, base)
        print(
            f"soak: {run.duration:.0f} s at concurrency {args.concurrency} against {base} "
            f"(model {args.model}, context {run.mix.num_ctx}, pid {pid})",
            flush=True,
        )
        run.epoch = time.perf_counter()
        end = run.epoch + run.duration
        workers = [
            asyncio.create_task(worker(run, client, i, end)) for i in range(args.concurrency)
        ]
        side = [
            asyncio.create_task(sampler(run, client, end)),
            asyncio.create_task(live_table(run, end)),
        ]
        done, pending = await asyncio.wait(
            workers, timeout=run.duration + args.request_timeout + 30
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, *side, return_exceptions=True)
        client_unfinished = len(pending)
        for task in done:
            if task.exception() is not None:
                print(f"soak: a worker failed: {task.exception()!r}", file=sys.stderr)
        report["drain"] = await drain(run, client)
        after = await fetch_metrics(client, base)
        if pid is not None and (value := rss_bytes(pid)) is not None:
            run.rss.append((time.perf_counter() - run.epoch, value))
        try:
            report["ps_after"] = (await client.get(base + "/api/ps", timeout=10.0)).json()
        except (httpx.HTTPError, ValueError) as err:
            report["ps_after"] = f"unreadable: {err}"
    if managed is not None:
        report["server"]["shutdown"] = managed.stop()

    rows = interval_rows(run)
    results = run.results
    by_scenario: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_scenario[r.scenario][r.outcome] += 1
    outcomes = Counter(r.outcome for r in results)
    report["intervals"] = rows
    report["totals"] = summarise(results, 0.0, run.duration, [v for _, v in run.rss], run.health)
    report["totals"]["by_scenario"] = {
        k: dict(sorted(v.items())) for k, v in sorted(by_scenario.items())
    }
    report["totals"]["by_endpoint_status"] = {
        f"{e} {s}": n
        for (e, s), n in sorted(Counter((r.endpoint, r.status or 0) for r in results).items())
    }
    report["bad_bodies"] = {
        k: dict(sorted(v.items())) for k, v in sorted(by_scenario.items()) if k.startswith("bad_")
    }
    bad_variants: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        if r.scenario.startswith("bad_"):
            bad_variants[f"{r.scenario}/{r.variant} {r.endpoint}"][r.outcome] += 1
    report["bad_body_variants"] = {k: dict(v) for k, v in sorted(bad_variants.items())}
    report["violations"] = violations(results)
    kv = None if after is None else metric_sum(after, "tandem_kv_cache_bytes")
    report["rss"] = rss_growth(run, kv)
    report["rss"]["samples_mb"] = [[round(t, 1), round(v / 2**20, 1)] for t, v in run.rss]
    report["health"] = {
        "probes": len(run.health),
        "failures": sum(1 for h in run.health if h[2] != "200"),
        "max_s": max((h[1] for h in run.health if h[1] is not None), default=None),
    }
    report["metrics"] = check_metrics(before, after, results)
    report["stuck"] = {
        "client_unfinished": client_unfinished,
        "server_running_after_drain": report["drain"].get("running"),
        "server_waiting_after_drain": report["drain"].get("waiting"),
        "drained": report["drain"].get("drained"),
    }
    if args.keep_requests:
        report["requests"] = [asdict(r) for r in results]

    failures, warnings = [], []
    five = sum(n for k, n in outcomes.items() if k.startswith("5xx"))
    if five:
        failures.append(f"{five} requests answered 5xx")
    for kind in FAILING_KINDS:
        if outcomes[kind]:
            failures.append(f"{outcomes[kind]} requests ended as {kind}")
    bad_not_4xx = sum(
        n
        for k, c in by_scenario.items()
        if k.startswith("bad_")
        for o, n in c.items()
        if outcome_class(o) != "4xx"
    )
    if bad_not_4xx:
        failures.append(f"{bad_not_4xx} bad-body requests were not refused with a 4xx")
    wrong = sum(
        1
        for r in results
        if not r.scenario.startswith("bad_")
        and r.outcome not in expected(r.scenario)
        and outcome_class(r.outcome) not in expected(r.scenario)
        and r.outcome not in FAILING_KINDS
        and not r.outcome.startswith("5xx")
        and r.outcome != TIMEOUT
    )
    if wrong:
        failures.append(f"{wrong} well-formed requests got an unexpected outcome (see violations)")
    if client_unfinished or not report["drain"].get("drained"):
        failures.append(
            f"stuck requests: {client_unfinished} client-side, server running/waiting after "
            f"drain {report['drain'].get('running')}/{report['drain'].get('waiting')}"
        )
    if report["metrics"].get("consistent") is False:
        failures.append(
            "/metrics disagrees with the client: " + "; ".join(report["metrics"]["mismatches"])
        )
    growth = report["rss"].get("growth")
    if growth is not None and growth > args.max_rss_growth:
        failures.append(
            f"RSS grew {growth:.0%} after warm-up beyond the KV allowance "
            f"({report['rss']['baseline_mb']} -> {report['rss']['end_mb']} MB, allowance "
            f"{report['rss']['kv_allowance_mb']} MB; limit {args.max_rss_growth:.0%})"
        )
    if outcomes[TIMEOUT]:
        warnings.append(
            f"{outcomes[TIMEOUT]} requests hit the {args.request_timeout:.0f} s deadline"
        )
    if report["health"]["failures"]:
        warnings.append(f"/health failed {report['health']['failures']} times")
    if not report["rss"].get("measured"):
        warnings.append("RSS not measured (give --pid with --url)")
    shutdown = report["server"].get("shutdown") or {}
    if shutdown.get("sigterm_obeyed") is False:
        failures.append("the server ignored SIGTERM (killed)")
    if shutdown.get("died_during_run"):
        failures.append(f"the server died during the run (exit {shutdown.get('returncode')})")
    report["failures"], report["warnings"] = failures, warnings
    report["ok"] = not failures

    print("\nper interval (latency: whole request, ok generation requests; ttft: streams)")
    print_table(rows)
    print("\nby scenario:")
    for name, c in sorted(by_scenario.items()):
        print(f"  {name:24s} " + " ".join(f"{k}={v}" for k, v in sorted(c.items())))
    r = report["rss"]
    if r.get("measured"):
        print(
            f"\nRSS: {r['start_mb']} MB at the start, {r['baseline_mb']} MB after warm-up -> "
            f"{r['end_mb']} MB at the end (raw growth {r['raw_growth']:.1%}; beyond the KV "
            f"allowance of {r['kv_allowance_mb']} MB {r['growth']:.1%}; peak {r['peak_mb']} MB)"
        )
    m = report["metrics"]
    print(
        f"/metrics consistent: {m.get('consistent')}"
        + ("" if not m.get("mismatches") else "  " + "; ".join(m["mismatches"]))
    )
    print(f"drain: {report['drain']}; client unfinished: {client_unfinished}")
    for v in report["violations"][:15]:
        print(
            f"  violation: {v['scenario']}/{v['variant']} {v['endpoint']} -> {v['outcome']}: "
            f"{v['detail'][:100]}  request={v['request'][:160]}"
        )
    for w in warnings:
        print(f"warning: {w}")
    for f in failures:
        print(f"FAIL: {f}")
    print("PASS" if not failures else "FAILED", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))
    return 0 if not failures else 1


def build_parser() -> argparse.ArgumentParser:
    mix = "\n".join(f"  {name:24s} {w:>4g}  {what}" for name, (w, what) in SCENARIOS.items())
    parser = argparse.ArgumentParser(
        description="Soak a tandem server with concurrent mixed requests.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios (name, default weight, what is sent):\n"
        + mix
        + "\n\nExit code: 0 pass, 1 a failure (5xx, connection errors, in-stream errors, "
        "bad bodies not refused with 4xx, stuck requests, /metrics mismatch, RSS growth), "
        "2 no server.",
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="run length (default 30)")
    parser.add_argument("--seconds", type=float, help="run length in seconds (overrides --minutes)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent requests (16)")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:11435")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    parser.add_argument("--model", default="smollm2", help="model to serve and request (smollm2)")
    parser.add_argument(
        "--port", type=int, help="port for the started server (default: a free one)"
    )
    parser.add_argument(
        "--server-arg", action="append", help="extra argument for `tandem serve` (repeatable)"
    )
    parser.add_argument("--server-log", help="where the started server's output goes")
    parser.add_argument("--mix", help="weights, e.g. 'chat=20,bad_oversized=0' (see below)")
    parser.add_argument("--interval", type=float, default=60.0, help="table row length, s (60)")
    parser.add_argument(
        "--request-timeout", type=float, default=120.0, help="per-request deadline, s (120)"
    )
    parser.add_argument(
        "--warmup-seconds", type=float, default=60.0, help="RSS baseline is taken after this (60)"
    )
    parser.add_argument(
        "--max-rss-growth", type=float, default=0.25, help="allowed RSS growth after warm-up (0.25)"
    )
    parser.add_argument(
        "--no-kv-allowance",
        dest="kv_allowance",
        action="store_false",
        help="judge raw RSS growth (by default the lazily committed KV pool's untouched part "
        "is allowed on top of --max-rss-growth)",
    )
    parser.add_argument("--drain-seconds", type=float, default=30.0, help="drain wait, s (30)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="server start, s")
    parser.add_argument(
        "--big-body-mb",
        type=float,
        default=9.0,
        help="the larger oversized body, MB: above the server's body limit (9; 8 MiB is its default)",
    )
    parser.add_argument("--num-ctx", type=int, help="context size, if /api/ps does not tell")
    parser.add_argument(
        "--no-sweep",
        dest="sweep",
        action="store_false",
        help="do not open with one request of every bad-body variant (about 80 requests)",
    )
    parser.add_argument("--seed", type=int, default=0, help="request mix seed (0)")
    parser.add_argument("--json-out", help="write every figure here as JSON")
    parser.add_argument(
        "--keep-requests", action="store_true", help="also put every request in the JSON"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or args.interval <= 0:
        raise SystemExit("--concurrency and --interval must be positive")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(soak(args))
    return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
