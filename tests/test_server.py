"""The HTTP server end to end: a real uvicorn on a loopback port, the real SmolLM2, the real
`openai` client for the OpenAI API and httpx2 (the HTTP client openai itself uses) for the
ollama API and raw streams. One server for the module; generations are a few tokens long.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
import uvicorn

from quant.errors import ModelNotFoundError
from runtime.server.app import create_app
from runtime.server.models import ModelRegistry, RegistryOptions

MODEL = "smollm2"
SERVED = "smollm2:latest"  # the name the server lists it under (the store's name:tag)
NUM_CTX = 512
# Greedy over 8 tokens, SmolLM2 puts >= 0.5 nats between its pick and the runner-up at every
# step for this prompt, so batching or prefix-cache numerics cannot flip a token.
CHAT = [{"role": "user", "content": "Tell me about the moon."}]
# Raw completion prompts for the concurrency test: 8 different ones, each sent twice.
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The best way to learn is",
    "Water boils at",
    "My favourite colour is",
    "In the morning I",
    "The cat sat on the",
    "Python is a",
]
NEAR_TIE = 0.05  # nats: a greedy pick this close to the runner-up may flip under batching


class Server:
    """uvicorn serving `app` on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(smollm2_path):
    app = create_app(RegistryOptions(num_ctx=NUM_CTX, max_num_seqs=16), preload=MODEL)
    srv = Server(app)
    srv.app = app
    deadline = time.time() + 300  # the first load may build the CPU kernel
    while httpx2.get(f"{srv.url}/health").status_code != 200:
        assert time.time() < deadline, "the preloaded model never became ready"
        time.sleep(0.1)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def lm(server):
    return server.app.state.tandem.registry.find(MODEL).lm


@pytest.fixture(scope="module")
def greedy_chat(client):
    return client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8)


def metrics(server) -> dict[str, float]:
    """The /metrics samples as {'name{labels}': value}, checking the text format as it goes."""
    text = httpx2.get(f"{server.url}/metrics").text
    sample = re.compile(
        r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})? '
        r"(\S+)$"
    )
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "histogram")
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        m = sample.match(line)
        assert m, f"not Prometheus text: {line!r}"
        base = re.sub(r"_(bucket|sum|count)$", "", m[1])
        assert m[1] in typed or base in typed, f"{m[1]} has no # TYPE"
        out[m[1] + (m[2] or "")] = float(m[4])
    return out


def engine_value(server, name: str) -> float:
    return metrics(server)[f'{name}{{model="{SERVED}"}}']


# -- health, models ------------------------------------------------------------------------


def test_health_is_503_while_the_preloaded_model_loads():
    release = threading.Event()

    def slow_loader(name):
        release.wait(10)
        raise ModelNotFoundError(f"no model {name!r}")

    srv = Server(create_app(registry=ModelRegistry(loader=slow_loader), preload="nothing"))
    try:
        loading = httpx2.get(f"{srv.url}/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        release.set()
        deadline = time.time() + 10
        while (failed := httpx2.get(f"{srv.url}/health")).json()["status"] == "loading":
            assert time.time() < deadline
            time.sleep(0.02)
        assert failed.status_code == 503 and "nothing" in failed.json()["error"]
    finally:
        release.set()
        srv.stop()


def test_health_ready_and_models_listed(server, client):
    assert httpx2.get(f"{server.url}/health").json() == {"status": "ok"}
    assert SERVED in [m.id for m in client.models.list().data]


# -- chat: plain vs streamed, usage, n, stop, logprobs -------------------------------------


def test_chat_plain_and_streamed_give_the_same_text_and_usage(client, lm, greedy_chat):
    plain = greedy_chat.choices[0]
    assert plain.message.role == "assistant" and plain.message.content
    assert plain.finish_reason in ("stop", "length")
    usage = greedy_chat.usage
    assert usage.prompt_tokens == len(lm.chat_prompt_ids(CHAT))
    assert (usage.completion_tokens == 8) == (plain.finish_reason == "length")
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n2_gives_two_complete_choices(client):
    out = client.chat.completions.create(
        model=MODEL, messages=CHAT, n=2, temperature=1.0, seed=3, max_tokens=4
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") and c.message.content for c in out.choices)
    assert out.usage.completion_tokens <= 8


def test_stop_string_is_never_emitted(client, greedy_chat):
    full = greedy_chat.choices[0].message.content
    stop = full.split()[1]  # a word from the middle of the greedy answer
    for stream in (False, True):
        res = client.chat.completions.create(
            model=MODEL, messages=CHAT, temperature=0, max_tokens=8, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(res)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = res.choices[0].message.content, res.choices[0].finish_reason
        assert text == full[: full.index(stop)] and stop not in text
        assert finish == "stop"


def test_chat_logprobs_shape(client, greedy_chat):
    # logprobs are of the model's own distribution; with the default repeat penalty (ollama's
    # 1.1) off, the greedy pick is its top candidate
    out = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        temperature=0,
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"repetition_penalty": 1.0},
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 3
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token  # greedy
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert bytes(t.bytes).decode() == t.token


def test_completions_logprobs_shape(client):
    out = client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=3, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(3)]
    assert all(
        len(top) == 2 and max(top.values()) == lp_
        for top, lp_ in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )


# -- errors ----------------------------------------------------------------------------------


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    err = info.value.body
    assert err["type"] == "invalid_request_error" and err["code"] == "model_not_found"
    assert "no-such-model" in err["message"]


@pytest.mark.parametrize("temperature", [-1, 2.5])
def test_bad_temperature_is_400(client, temperature):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=temperature)
    assert info.value.body["param"] == "temperature"
    assert info.value.body["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_context_length_exceeded(client):
    long = [{"role": "user", "content": "word " * (NUM_CTX + 10)}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"
    assert str(NUM_CTX) in info.value.body["message"]


@pytest.mark.parametrize(
    "extra",
    [
        {"logit_bias": {"1": 5}},
        {"functions": [{"name": "f", "parameters": {}}]},
        {"guided_regex": "[0-9]+"},
    ],
)
def test_unsupported_fields_are_refused_not_ignored(client, extra):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body=extra)
    assert info.value.body["param"] == next(iter(extra))
    message = info.value.body["message"]
    assert "not supported" in message or "cannot honour" in message


def test_routine_extra_fields_are_ignored_and_named(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=2,
        temperature=0,
        extra_body={"cache_prompt": True, "skip_special_tokens": True},
    )
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-tandem-ignored-fields"] == "cache_prompt, skip_special_tokens"


def test_invalid_json_body_is_400(server):
    res = httpx2.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert res.status_code == 400 and "JSON" in res.json()["error"]["message"]


# -- concurrency and disconnects ----------------------------------------------------------


def _greedy(client, prompt: str, stream: bool) -> tuple[list[str], list[dict]]:
    """Tokens and top-2 logprobs of an 8-token greedy completion."""
    args = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, logprobs=2)
    if not stream:
        lp = client.completions.create(**args).choices[0].logprobs
        return lp.tokens, lp.top_logprobs
    tokens, tops = [], []
    for chunk in client.completions.create(**args, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            tops += chunk.choices[0].logprobs.top_logprobs
    return tokens, tops


def test_16_concurrent_streams_each_equal_their_sequential_greedy_output(client):
    reference = {p: _greedy(client, p, stream=False) for p in PROMPTS}
    work = PROMPTS * 2
    with ThreadPoolExecutor(len(work)) as pool:
        results = list(pool.map(lambda p: _greedy(client, p, stream=True), work))
    for prompt, (tokens, _) in zip(work, results, strict=True):
        ref_tokens, ref_tops = reference[prompt]
        if tokens == ref_tokens:
            continue
        k = next(i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b)
        gap = sorted(ref_tops[k].values())[-1] - sorted(ref_tops[k].values())[-2]
        assert gap < NEAR_TIE, f"{prompt!r}: {tokens} != {ref_tokens} at {k} (gap {gap:.3f})"


def test_a_dropped_stream_is_aborted_and_others_complete(server, client):
    before = metrics(server)
    body = {
        "model": MODEL,
        "prompt": "Count: one, two,",
        "max_tokens": 300,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    others = ThreadPoolExecutor(3)
    with httpx2.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as res:
        assert res.status_code == 200
        chunks = 0
        for line in res.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 2:
                break
        futures = [others.submit(_greedy, client, p, True) for p in PROMPTS[:3]]
    # the connection is closed here, after two chunks
    for f in futures:
        tokens, _ = f.result(timeout=120)
        assert len(tokens) == 8
    deadline = time.time() + 30
    while engine_value(server, "tandem_running_sequences") or engine_value(
        server, "tandem_queue_depth"
    ):
        assert time.time() < deadline, "the dropped request is still running"
        time.sleep(0.1)
    after = metrics(server)
    assert after["tandem_requests_aborted_total"] == before["tandem_requests_aborted_total"] + 1
    key = f'tandem_generation_tokens_total{{model="{SERVED}"}}'
    assert after[key] - before[key] < 300  # it did not run to its 300 tokens


def test_a_client_that_leaves_a_whole_answer_is_aborted(server):
    before = metrics(server)["tandem_requests_aborted_total"]
    # Nearly the whole context (2+ s of decode at today's speed), left after 0.3 s: the
    # server's disconnect poll (every 0.5 s) must find it gone well before the answer ends.
    body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
    deadline = time.time() + 30
    while metrics(server)["tandem_requests_aborted_total"] == before:
        assert time.time() < deadline, "the abandoned request was not aborted"
        time.sleep(0.1)
    while engine_value(server, "tandem_running_sequences"):
        assert time.time() < deadline
        time.sleep(0.1)


def test_metrics_exposition(server):
    m = metrics(server)
    for name in (
        "tandem_running_sequences",
        "tandem_queue_depth",
        "tandem_kv_blocks_used",
        "tandem_kv_blocks_free",
        "tandem_prompt_tokens_total",
        "tandem_generation_tokens_total",
    ):
        assert f'{name}{{model="{SERVED}"}}' in m
    assert m['tandem_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert m['tandem_requests_total{endpoint="/v1/chat/completions",status="404"}'] >= 1
    for hist in ("tandem_time_to_first_token_seconds", "tandem_inter_token_latency_seconds"):
        buckets = [v for k, v in m.items() if k.startswith(f"{hist}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == m[f"{hist}_count"] > 0
        assert m[f"{hist}_sum"] > 0


# -- the ollama API -----------------------------------------------------------------------


def test_ollama_chat_ndjson_stream_equals_the_whole_answer(server):
    body = {"model": MODEL, "messages": CHAT, "options": {"temperature": 0, "num_predict": 6}}
    with httpx2.stream("POST", f"{server.url}/api/chat", json=body, timeout=60) as res:
        assert res.headers["content-type"].startswith("application/x-ndjson")
        objs = [json.loads(line) for line in res.iter_lines() if line]
    assert all(not o["done"] for o in objs[:-1]) and objs[-1]["done"]
    final = objs[-1]
    assert final["done_reason"] in ("stop", "length")
    for key in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        assert isinstance(final[key], int) and final[key] >= 0
    assert final["eval_count"] <= 6 and final["total_duration"] >= final["eval_duration"] > 0
    streamed = "".join(o["message"]["content"] for o in objs)
    whole = httpx2.post(f"{server.url}/api/chat", json={**body, "stream": False}, timeout=60).json()
    assert whole["done"] and whole["message"] == {"role": "assistant", "content": streamed}


def test_ollama_generate_not_streamed(server, lm):
    body = {
        "model": MODEL,
        "prompt": "Why is the sky blue?",
        "stream": False,
        "options": {"temperature": 0, "num_predict": 5, "num_ctx": 256, "num_batch": 512},
    }
    out = httpx2.post(f"{server.url}/api/generate", json=body, timeout=60).json()
    assert out["done"] and out["response"] and out["done_reason"] in ("stop", "length")
    prompt_ids = lm.chat_prompt_ids([{"role": "user", "content": body["prompt"]}])
    assert out["prompt_eval_count"] == len(prompt_ids)
    assert out["context"][: len(prompt_ids)] == prompt_ids
    assert len(out["context"]) == len(prompt_ids) + min(out["eval_count"], 5)


def test_ollama_errors(server):
    url = f"{server.url}/api/generate"
    bad = httpx2.post(url, json={"model": MODEL, "prompt": "x", "options": {"mirostat": 2}})
    assert bad.status_code == 400 and "mirostat" in bad.json()["error"]
    big = httpx2.post(url, json={"model": MODEL, "prompt": "x", "options": {"num_ctx": 10**6}})
    assert big.status_code == 400 and "num_ctx" in big.json()["error"]
    missing = httpx2.post(url, json={"model": "no-such-model", "prompt": "x"})
    assert missing.status_code == 404 and "no-such-model" in missing.json()["error"]


def test_ollama_model_endpoints(server, capsys):
    tags = httpx2.get(f"{server.url}/api/tags").json()["models"]
    assert SERVED in [m["name"] for m in tags]
    shown = httpx2.post(f"{server.url}/api/show", json={"model": MODEL}).json()
    assert shown["details"]["family"] == "llama" and shown["details"]["format"] == "gguf"
    assert shown["details"]["quantization_level"] == "Q4_1"
    running = httpx2.get(f"{server.url}/api/ps").json()["models"]
    entry = next(m for m in running if m["name"] == SERVED)
    assert entry["context_length"] == NUM_CTX and entry["size_vram"] == 0
    from modelfiles.names import ModelName
    from modelfiles.store import Store

    stored_id = Store().get(ModelName.parse(MODEL)).id  # `tandem list`'s ID: one id everywhere
    assert entry["size"] > 0 and entry["digest"].startswith(stored_id)
    assert httpx2.get(f"{server.url}/api/version").json()["version"]

    from runtime.cli.main import main

    assert main(["ps", "--host", server.url.removeprefix("http://")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    row = next(line for line in out if line.startswith(SERVED))
    assert stored_id in row and "100% CPU" in row and "Forever" in row
