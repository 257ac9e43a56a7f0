"""Issue 13's server findings, each as the input that hurt and the bounded outcome it gets now:
oversized, deep, non-finite and mistyped bodies; foreign Host and Origin headers; paths a
client may not open; pulls a request may not start; unhandled errors; streams refused after
their status line; copies of one model; a process SIGTERM could not stop.

Servers are real uvicorns on loopback (test_server.Server). `bare` has no model loaded (its
requests fail before any model work or at loading); `smol` serves SmolLM2 with a small
context and a 4-sample queue.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
from fastapi.testclient import TestClient
from test_server import Server

from runtime.loaded_model import LoadedModel
from runtime.server.app import create_app
from runtime.server.guard import DEFAULT_MAX_BODY
from runtime.server.models import ModelRegistry, RegistryOptions, ServedModel

SECRET = "root:x:0:0:SECRET-CONTENTS"
CHAT = [{"role": "user", "content": "Hi"}]
REPO = Path(__file__).resolve().parents[1]


def _loader(name: str) -> LoadedModel:
    if name.startswith("boom"):
        raise RuntimeError(SECRET)  # an unexpected failure quoting what it should not
    return LoadedModel.load(name)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    models, outside = root / "models", root / "outside"
    models.mkdir()
    outside.mkdir()
    (outside / "secret.gguf").write_text(SECRET)
    (models / "notgguf.gguf").write_text(SECRET)
    (models / "escape.gguf").symlink_to(outside / "secret.gguf")
    return models, outside


@pytest.fixture(scope="module")
def bare(dirs):
    models, _ = dirs
    registry = ModelRegistry(RegistryOptions(models_dirs=(str(models),)), loader=_loader)
    srv = Server(create_app(registry=registry))
    yield srv
    srv.stop()


def _conn(srv) -> http.client.HTTPConnection:
    parts = urlsplit(srv.url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)


def _exchange(conn, method: str, path: str, body: bytes | None, headers: dict) -> tuple:
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read(), resp


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- bounded bodies ---------------------------------------------------------------------------


def _body(total: int, chunk: int = 1 << 20):
    """A JSON chat body of `total` bytes (one long word), produced piecewise."""
    head = b'{"model": "m", "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    yield head
    left = total - len(head) - len(tail)
    while left > 0:
        n = min(chunk, left)
        yield b"a" * n
        left -= n
    yield tail


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
def test_a_50mb_body_is_413_quickly_with_bounded_memory(bare, announced):
    size = 50 * 2**20
    headers = {"Content-Type": "application/json"}
    if announced:
        headers["Content-Length"] = str(size)
    peak, before, done = [0], _rss(), threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        for path in ("/v1/chat/completions", "/api/chat"):
            r = httpx2.post(f"{bare.url}{path}", content=_body(size), headers=headers, timeout=60)
            assert r.status_code == 413, r.text
            err = r.json()["error"]
            message = err["message"] if path.startswith("/v1") else err
            assert str(DEFAULT_MAX_BODY) in message
    finally:
        done.set()
        sampler.join()
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"two 50 MB refusals took {elapsed:.1f}s"
    assert peak[0] - before < 40 * 2**20, f"RSS grew {(peak[0] - before) / 2**20:.0f} MiB"
    print(f"two 50 MB bodies refused in {elapsed:.2f}s, RSS +{(peak[0] - before) / 2**20:.1f} MiB")


def test_a_body_just_under_the_limit_is_read(bare):
    body = json.dumps({"model": "no-such-model", "messages": CHAT, "user": "x" * (1 << 20)})
    r = httpx2.post(f"{bare.url}/v1/chat/completions", content=body, headers=_json())
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _json() -> dict:
    return {"Content-Type": "application/json"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat", "/api/generate"])
def test_100k_deep_json_is_400_in_shape_and_the_connection_stays(bare, path):
    conn = _conn(bare)
    deep = b"[" * 100_000 + b"]" * 100_000
    status, raw, resp = _exchange(conn, "POST", path, deep, _json())
    assert status == 400 and not resp.will_close
    err = json.loads(raw)["error"]
    assert "deep" in (err["message"] if path.startswith("/v1") else err)
    # the same connection answers the next request
    status, raw, _ = _exchange(conn, "GET", "/api/version", None, {})
    assert status == 200 and json.loads(raw)["version"]
    conn.close()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/generate", b'{"model": "m", "prompt": "x", "keep_alive": 1e400}'),
        ("/api/generate", b'{"model": "m", "prompt": "x", "keep_alive": -1e400}'),
        ("/api/chat", b'{"model": "m", "messages": [], "options": {"temperature": NaN}}'),
        ("/v1/chat/completions", b'{"model": "m", "messages": [], "temperature": Infinity}'),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "seed": ' + b"9" * 4000 + b"}"),
    ],
)
def test_non_finite_and_huge_numbers_are_400(bare, path, body):
    conn = _conn(bare)
    status, raw, resp = _exchange(conn, "POST", path, body, _json())
    assert status == 400 and not resp.will_close, raw
    err = json.loads(raw)["error"]
    assert "range" in str(err) or "not a JSON number" in str(err)
    conn.close()


@pytest.mark.parametrize("value", ["1e400", float("inf"), float("-inf"), float("nan"), "NaN"])
def test_keep_alive_must_be_finite(value):
    from runtime.server.errors import RequestFieldError
    from runtime.server.keep_alive import parse_keep_alive

    with pytest.raises(RequestFieldError, match="keep_alive"):
        parse_keep_alive(value)


def test_a_keep_alive_of_centuries_is_forever_not_an_overflow():
    from runtime.server.keep_alive import parse_keep_alive

    assert parse_keep_alive(1e300) == math.inf and parse_keep_alive("99999999999h") == math.inf


# -- unhandled errors -------------------------------------------------------------------------


def test_an_unhandled_error_is_500_in_the_apis_shape_and_keeps_the_connection(bare):
    conn = _conn(bare)
    body = json.dumps({"model": "boom", "messages": CHAT}).encode()
    status, raw, resp = _exchange(conn, "POST", "/v1/chat/completions", body, _json())
    assert status == 500 and not resp.will_close
    err = json.loads(raw)["error"]
    assert err["type"] == "server_error" and "RuntimeError" in err["message"]
    assert "SECRET" not in raw.decode()
    body = json.dumps({"model": "boom", "prompt": "x"}).encode()
    status, raw, resp = _exchange(conn, "POST", "/api/generate", body, _json())
    assert status == 500 and not resp.will_close
    assert "RuntimeError" in json.loads(raw)["error"] and "SECRET" not in raw.decode()
    conn.close()


def test_unknown_routes_and_methods_answer_in_the_apis_shape(bare):
    r = httpx2.get(f"{bare.url}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx2.get(f"{bare.url}/api/nope")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = httpx2.get(f"{bare.url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json() and "POST" in r.headers["allow"]


# -- Host, Origin, content type ---------------------------------------------------------------


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("evil.example", False),
        ("evil.example:11435", False),
        ("127.0.0.1.nip.io", False),
        ("localhost:11435", True),
        ("127.0.0.1", True),
        ("[::1]:8080", True),
        ("app.localhost", True),
        ("printer.local", True),
        ("host.docker.internal", True),
        ("192.168.1.20", True),
        (socket.gethostname(), True),
    ],
)
def test_host_must_name_this_machine(bare, host, allowed):
    for path in ("/api/tags", "/v1/models"):
        r = httpx2.get(f"{bare.url}{path}", headers={"Host": host})
        assert r.status_code == (200 if allowed else 403), (host, r.text)
        if not allowed:
            body = r.json()["error"]
            assert "Host" in (body["message"] if path.startswith("/v1") else body)


def test_origin_is_checked_against_the_allowlist(bare):
    url = f"{bare.url}/api/tags"
    r = httpx2.get(url, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "TANDEM_ORIGINS" in r.json()["error"]
    for origin in ("http://localhost:3000", "https://127.0.0.1", "app://x", "tauri://localhost"):
        r = httpx2.get(url, headers={"Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    pre = httpx2.options(
        f"{bare.url}/v1/chat/completions",
        headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
    pre = httpx2.options(
        f"{bare.url}/v1/chat/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 403


def test_tandem_origins_extends_the_allowlist(monkeypatch):
    monkeypatch.setenv("TANDEM_ORIGINS", "https://app.example.com, https://*.corp.example")
    client = TestClient(create_app(registry=ModelRegistry(loader=_loader)), "http://localhost")
    for origin, status in [
        ("https://app.example.com", 200),
        ("https://wiki.corp.example", 200),
        ("https://evil.example", 403),
    ]:
        assert client.get("/api/version", headers={"Origin": origin}).status_code == status
    monkeypatch.setenv("TANDEM_ORIGINS", "*")
    client = TestClient(create_app(registry=ModelRegistry(loader=_loader)), "http://localhost")
    assert client.get("/api/version", headers={"Origin": "https://any.example"}).status_code == 200


def test_a_body_must_be_json(bare):
    body = json.dumps({"model": "no-such-model", "prompt": "x"})
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "multipart/form-data; boundary=x"):
        r = httpx2.post(f"{bare.url}/api/generate", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = httpx2.post(
        f"{bare.url}/v1/completions", content=body, headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    # curl -d (form-urlencoded, no Origin) still works; the same from a page does not
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = httpx2.post(f"{bare.url}/api/generate", content=body, headers=form)
    assert r.status_code == 404
    r = httpx2.post(
        f"{bare.url}/api/generate", content=body, headers={**form, "Origin": "http://localhost"}
    )
    assert r.status_code == 415


# -- what a client may name --------------------------------------------------------------------


def _names(models: Path, outside: Path) -> list[str]:
    return [
        "/etc/shadow",
        "/etc/passwd",
        "/no/such/file.gguf",
        str(outside / "secret.gguf"),
        str(models / ".." / "outside" / "secret.gguf"),
        f"{models}/./../outside/secret.gguf",
        str(models / "escape.gguf"),  # a symlink out of the models dir
        "../../../../../../etc/passwd",
        "~/.ssh/id_rsa",
    ]


def test_paths_outside_the_models_dirs_are_refused_alike(bare, dirs):
    models, outside = dirs
    for name in _names(models, outside):
        for path, body in [
            ("/v1/chat/completions", {"model": name, "messages": CHAT}),
            ("/api/generate", {"model": name, "prompt": "x"}),
            ("/api/show", {"model": name}),
        ]:
            r = httpx2.post(f"{bare.url}{path}", json=body)
            assert r.status_code == 404, (name, path, r.text)
            assert "SECRET" not in r.text and "x:0:0" not in r.text and "magic" not in r.text
            message = r.json()["error"]
            message = message["message"] if path.startswith("/v1") else message
            assert message.replace(repr(name)[1:-1], "NAME") == (
                "model 'NAME' is not served here: name a stored model (GET /api/tags), or a "
                ".gguf file under a directory the server was started with --models-dir"
            ), message


def test_a_file_in_a_models_dir_that_is_not_gguf_is_not_quoted(bare, dirs):
    models, _ = dirs
    for name in (str(models / "notgguf.gguf"), f"{models}/./notgguf.gguf"):
        for path, body in [
            ("/api/generate", {"model": name, "prompt": "x"}),
            ("/api/show", {"model": name}),
        ]:
            r = httpx2.post(f"{bare.url}{path}", json=body)
            assert r.status_code == 400 and "not a usable GGUF" in r.json()["error"], r.text
            assert "SECRET" not in r.text and "x:0:0" not in r.text and "magic" not in r.text


def test_a_pullable_model_is_not_pulled_by_a_request(bare, tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))  # nothing pulled here
    start = time.perf_counter()
    for path, body in [
        ("/api/generate", {"model": "gemma3", "prompt": "x"}),
        ("/v1/chat/completions", {"model": "gemma3:latest", "messages": CHAT}),
        ("/api/show", {"model": "gemma3"}),
    ]:
        r = httpx2.post(f"{bare.url}{path}", json=body)
        assert r.status_code == 404 and "tandem pull gemma3" in r.text, r.text
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "models" / "blobs").exists() or not any(
        (tmp_path / "models" / "blobs").iterdir()
    )


# -- caps on one request ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"n": 17}, "n"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_request_caps(bare, extra, field):
    r = httpx2.post(
        f"{bare.url}/v1/chat/completions",
        json={"model": "no-such-model", "messages": CHAT, **extra},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_a_million_stop_strings_are_refused_at_once(bare):
    body = json.dumps({"model": "m", "messages": CHAT, "stop": ["ab"] * 1_000_000})
    assert len(body) < DEFAULT_MAX_BODY
    start = time.perf_counter()
    r = httpx2.post(f"{bare.url}/v1/chat/completions", content=body, headers=_json())
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert len(r.text) < 1000  # the message does not echo the list
    body = json.dumps({"model": "m", "prompt": "x", "options": {"stop": ["ab"] * 1_000_000}})
    r = httpx2.post(f"{bare.url}/api/generate", content=body, headers=_json())
    assert r.status_code == 400 and len(r.text) < 1000
    assert time.perf_counter() - start < 10


# -- loaded models: one per canonical path, at most max_loaded ---------------------------------


class _FakeEngine:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _fake_registry(max_loaded: int, models_dirs: tuple[str, ...] = ()) -> ModelRegistry:
    """A registry whose loads make a ServedModel around a fake engine, recording the keys."""
    options = RegistryOptions(max_loaded=max_loaded, models_dirs=models_dirs)
    registry = ModelRegistry(options, loader=_loader)
    loads = registry.loads = []

    def load(key: str, trusted: bool = True) -> ServedModel:
        loads.append(key)
        return ServedModel(key, None, _FakeEngine(), time.time(), 300.0)

    registry._load = load
    return registry


def test_the_least_recently_used_idle_model_is_unloaded_and_all_busy_is_503():
    from quant.errors import QueueFullError

    async def scenario():
        registry = _fake_registry(2)
        a, _ = await registry.get("a")
        b, _ = await registry.get("b")
        registry.release(b)
        time.sleep(0.01)
        registry.release(a)  # b is the least recently used now
        c, _ = await registry.get("c")
        assert b.engine.closed and not a.engine.closed
        assert sorted(m.name for m in registry.loaded()) == ["a:latest", "c:latest"]
        again, _ = await registry.get("a")  # a busy too now: nothing can go
        assert again is a
        with pytest.raises(QueueFullError, match="all are busy"):
            await registry.get("d")
        assert registry.loads == ["a:latest", "b:latest", "c:latest"]
        registry.release(c)
        d, _ = await registry.get("d")  # c idle: it goes
        assert c.engine.closed and sorted(m.name for m in registry.loaded()) == [
            "a:latest",
            "d:latest",
        ]

    asyncio.run(scenario())


def test_path_spellings_share_one_loaded_copy(dirs):
    models, _ = dirs
    (models / "m.gguf").write_bytes(b"")
    registry = _fake_registry(3, (f"{models}/./",))
    spellings = [
        str(models / "m.gguf"),
        f"{models}/./m.gguf",
        f"{models}/../{models.name}/m.gguf",
        f"{models}//m.gguf",
    ]

    async def scenario():
        for name in spellings:
            served, _ = await registry.get(name)
            registry.release(served)

    asyncio.run(scenario())
    assert registry.loads == [os.path.realpath(models / "m.gguf")]


# -- with a model: prompt bounds, admission before the status line -----------------------------


@pytest.fixture(scope="module")
def smol(smollm2_path):
    options = RegistryOptions(num_ctx=256, max_num_seqs=4, max_waiting=4)
    srv = Server(create_app(options, preload="smollm2"))
    deadline = time.time() + 300
    while (health := httpx2.get(f"{srv.url}/health")).status_code != 200:
        assert health.json()["status"] == "loading", health.text
        assert time.time() < deadline, "the preloaded model never became ready"
        time.sleep(0.1)
    yield srv
    srv.stop()


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(smol):
    word = "a" * (4 * 2**20 - 1000)  # one 4 MB word: 28 s of tokenizing before
    start = time.perf_counter()
    r = httpx2.post(
        f"{smol.url}/v1/chat/completions",
        json={"model": "smollm2", "messages": [{"role": "user", "content": word}]},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx2.post(
        f"{smol.url}/api/generate", json={"model": "smollm2", "prompt": word}, timeout=60
    )
    assert r.status_code == 400 and "characters" in r.json()["error"]
    r = httpx2.post(
        f"{smol.url}/v1/completions", json={"model": "smollm2", "prompt": word}, timeout=60
    )
    assert r.status_code == 400
    assert time.perf_counter() - start < 5


def test_540_streams_over_a_4_sample_queue_get_200_with_content_or_503(smol):
    """Admission is decided before the status line: no 200 that then carries an error."""

    async def one(client, i: int) -> tuple[int, str, str | None]:
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": f"Count to {i % 7}"}],
            "max_tokens": 2,
            "stream": True,
            "temperature": 0,
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            text = (await r.aread()).decode()
            return r.status_code, text, r.headers.get("retry-after")

    async def run():
        limits = httpx2.Limits(max_connections=600, max_keepalive_connections=0)
        async with httpx2.AsyncClient(base_url=smol.url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(540)))

    for _ in range(2):  # before, one burst in three or so had a 200 that then failed
        start = time.perf_counter()
        results = asyncio.run(run())
        elapsed = time.perf_counter() - start
        ok = [t for s, t, _ in results if s == 200]
        refused = [(t, ra) for s, t, ra in results if s == 503]
        assert len(ok) + len(refused) == 540, {s for s, _, _ in results}
        assert ok and refused, (len(ok), len(refused))
        for text in ok:
            assert '"error"' not in text and text.rstrip().endswith("data: [DONE]"), text[-300:]
            assert '"content"' in text
        for text, retry_after in refused:
            assert retry_after and json.loads(text)["error"]["type"] == "service_unavailable_error"
        print(f"540 streams: {len(ok)} served, {len(refused)} refused in {elapsed:.1f}s")


# -- SIGTERM ------------------------------------------------------------------------------------

_STUCK_SERVER = textwrap.dedent(
    """
    import asyncio, sys, threading
    from runtime.server import app as appmod
    from runtime.server.models import ModelRegistry, RegistryOptions

    appmod.GRACEFUL_SECONDS, appmod.SHUTDOWN_SECONDS, appmod.EXIT_GRACE_SECONDS = 1, 1.0, 0.5
    never = threading.Event()


    class Registry(ModelRegistry):
        async def close(self):  # as closing an engine does: it needs a worker thread
            await asyncio.to_thread(lambda: None)


    def stuck(name):  # a load (or a render) that never ends, pinning a worker thread
        never.wait()


    registry = Registry(RegistryOptions(max_loaded=100), loader=stuck)
    appmod.run(appmod.create_app(registry=registry), "127.0.0.1", int(sys.argv[1]))
    """
)


def test_sigterm_stops_a_server_whose_worker_threads_are_all_stuck(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "stuck_server.py"
    script.write_text(_STUCK_SERVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(port)], env=env, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx2.get(f"{url}/health").status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.1)

        def ask(i: int) -> None:  # distinct names: each load pins its own worker thread
            try:
                httpx2.post(f"{url}/api/generate", json={"model": f"m{i}", "prompt": "x"})
            except httpx2.TransportError:
                pass

        askers = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(40)]
        for t in askers:
            t.start()
        time.sleep(2)  # every worker thread of the loop's executor is stuck now
        proc.send_signal(signal.SIGTERM)
        start = time.perf_counter()
        proc.wait(timeout=30)
        assert time.perf_counter() - start < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_unknown_model_name_is_refused_before_any_loaded_model_is_unloaded(
    tmp_path, monkeypatch
):
    """Found by scripts/soak.py: six concurrent requests naming models that do not exist
    unloaded the served model (a place was reserved, evicting it, before the name failed)."""
    from quant.errors import ModelNotFoundError

    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))

    async def scenario():
        registry = ModelRegistry(RegistryOptions(max_loaded=1))
        served = ServedModel("smollm2:latest", None, _FakeEngine(), time.time(), 300.0)
        registry._models["smollm2:latest"] = served
        for i in range(6):
            with pytest.raises(ModelNotFoundError, match="not found"):
                await registry.get(f"soak-no-such-{i}")
        assert registry.find("smollm2") is served and not served.engine.closed

    asyncio.run(scenario())


def test_serve_refuses_a_models_dir_that_does_not_exist(tmp_path, capsys):
    """A mistyped --models-dir used to be dropped silently (no path would ever be served)."""
    from runtime.cli.main import main

    assert main(["serve", "--models-dir", str(tmp_path / "nope")]) != 0
    assert "no such directory" in capsys.readouterr().err
