"""Pulling `NAME[:TAG]` from an ollama registry against a loopback server that speaks its
protocol (tests/registry_server.py: manifests, blobs redirected to a CDN path, ranges), serving
the real SmolLM2 GGUF from the test cache in place plus template, system and params layers: a
pull that registers a runnable model with those settings, a cut connection resumed, a
corrupted blob refused, unknown / private / unreachable names refused with typed errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from registry_server import Registry, blob

from loaders.ollama_pull import RegistryRef, parse_ref
from loaders.pull import KNOWN
from modelfiles.names import ModelName
from modelfiles.registry_models import ensure_registry, from_registry, stored_name
from modelfiles.resolver import resolve
from modelfiles.store import Store
from quant.errors import (
    DigestMismatchError,
    ModelNotFoundError,
    PullError,
    RegistryUnreachableError,
)

SHA = KNOWN["smollm2"].sha256
TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ .Prompt }}"
SYSTEM = "You are a terse test assistant."
PARAMS = {"temperature": 0.25, "stop": ["<|im_end|>", "<|im_start|>"], "top_k": 7}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    return tmp_path / "home"


@pytest.fixture
def registry(smollm2_blob, tmp_path, monkeypatch):
    layers = tmp_path / "layers"
    layers.mkdir()
    (layers / "template").write_text(TEMPLATE)
    (layers / "system").write_text(SYSTEM)
    (layers / "params").write_text(json.dumps(PARAMS))
    model = [
        blob("model", smollm2_blob, SHA),
        *(blob(kind, layers / kind) for kind in ("template", "system", "params")),
    ]
    with Registry({"library/smolreg:latest": model, "tester/smolreg:q4_1": model}) as server:
        monkeypatch.setenv("TANDEM_OLLAMA_REGISTRY", server.url)
        yield server


def blob_gets(reg: Registry) -> list[str | None]:
    """The Range header of each GET of the model's bytes."""
    return [r for m, p, r, _ in reg.requests if m == "GET" and p == f"/cdn/{SHA}"]


def test_names():
    assert parse_ref("llama3.2") == RegistryRef(None, "library", "llama3.2", "latest")
    assert parse_ref("Me/Model:Q4") == RegistryRef(None, "me", "model", "q4")
    assert parse_ref("h.io:5000/ns/m:t") == RegistryRef("h.io:5000", "ns", "m", "t")
    assert str(stored_name("registry.ollama.ai/library/llama3.2")) == "llama3.2:latest"
    assert str(stored_name("library/llama3.2:1b")) == "llama3.2:1b"
    assert str(stored_name("127.0.0.1:8/ns/m:t")) == "127.0.0.1:8/ns/m:t"
    for bad in ("a/b/c/d", "../x", "x:t/a", "-x"):
        with pytest.raises(ModelNotFoundError, match="NAMESPACE/NAME"):
            parse_ref(bad)


def test_catalog_names_come_first(registry):
    """Catalog names keep going to tandem's catalog; another name goes to the registry."""
    for name in ("smollm2", "gemma3", "gemma3:latest", "qwen2.5-coder:0.5b"):
        assert not from_registry(name), name
    assert from_registry("llama3.2") and from_registry("qwen2.5-coder:7b")
    assert registry.requests == []


def test_pull_registers_and_resolves(home, registry):
    name, manifest = ensure_registry(Store(), "smolreg")
    assert str(name) == "smolreg:latest"
    assert manifest.model.digest == f"sha256:{SHA}"
    # the template, system and params layers are the stored model's settings
    assert (manifest.template, manifest.system) == (TEMPLATE, SYSTEM)
    assert manifest.parameters == PARAMS
    blob_file = home / "models" / "blobs" / f"sha256-{SHA}"
    assert blob_file.is_file() and not list(blob_file.parent.glob("*.download"))
    assert [str(n) for n, _ in Store().list()] == ["smolreg:latest"]
    # the manifest was asked for as ollama asks, the blob's redirect followed
    gets = [(p, a) for m, p, _, a in registry.requests if "/manifests/" in p]
    assert gets == [
        (
            "/v2/library/smolreg/manifests/latest",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
    ]
    assert any(p == f"/v2/library/smolreg/blobs/sha256:{SHA}" for _, p, _, _ in registry.requests)
    assert blob_gets(registry) == [None]
    served, asked = registry.served, len(registry.requests)
    for text in ("smolreg", "library/smolreg:latest", "registry.ollama.ai/library/smolreg"):
        spec = resolve(text)  # stored now: no network
        assert spec.path == blob_file and spec.template == TEMPLATE and spec.system == SYSTEM
        assert spec.parameters == PARAMS
    assert len(registry.requests) == asked
    # a second pull asks for the manifest again and downloads nothing
    ensure_registry(Store(), "smolreg", refresh=True)
    assert registry.served == served and blob_gets(registry) == [None]


def test_other_namespace_and_host(home, registry):
    """`NS/NAME:TAG` goes to the configured registry; `HOST:PORT/NS/NAME:TAG` to that host."""
    name, _ = ensure_registry(Store(), "tester/smolreg:Q4_1")
    assert str(name) == "tester/smolreg:q4_1"
    named = f"{registry.host}/tester/smolreg:q4_1"
    spec = resolve(named)  # pulled through the name's host (its blobs already here)
    assert spec.path.name == f"sha256-{SHA}"
    assert {str(n) for n, _ in Store().list()} == {str(name), named}
    assert Store().get(ModelName.parse(named)) is not None


def test_cut_connection_resumes(home, registry):
    size = registry.by_sha[SHA].size
    registry.cut_after = 40_000_000
    ensure_registry(Store(), "smolreg")
    ranges = blob_gets(registry)
    assert len(ranges) == 2 and ranges[0] is None
    kept = int(str(ranges[1]).removeprefix("bytes=").removesuffix("-"))
    assert 30_000_000 < kept <= 40_000_000
    assert registry.served < 1.5 * size
    assert Store().get(ModelName.parse("smolreg")) is not None


def test_interrupted_pull_resumes_next_time(home, registry):
    """The registry goes away after the cut: the pull fails, keeping what it downloaded; the
    next pull asks only for the rest."""
    size = registry.by_sha[SHA].size
    registry.cut_after, registry.down_after_cut = 30_000_000, True
    with pytest.raises(PullError, match="answered 503 .*run the pull again later to resume"):
        ensure_registry(Store(), "smolreg")
    partial = home / "models" / "blobs" / f"sha256-{SHA}.download"
    kept = partial.stat().st_size
    assert 20_000_000 < kept <= 30_000_000
    assert Store().list() == []
    registry.down = False
    ensure_registry(Store(), "smolreg")
    assert blob_gets(registry)[-1] == f"bytes={kept}-"
    assert registry.served < 1.5 * size and not partial.exists()


def test_corrupted_blob_refused(home, registry):
    registry.corrupt = True
    with pytest.raises(DigestMismatchError, match="smolreg:latest.*nothing was registered"):
        ensure_registry(Store(), "smolreg")
    blobs = home / "models" / "blobs"
    assert not (blobs / f"sha256-{SHA}").exists()
    assert not list(blobs.glob("*.download"))
    assert Store().list() == []


def test_unknown_private_unreachable(home, registry, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="'nosuch:latest' was not found .*404"):
        resolve("nosuch")
    registry.private.add("library/smolreg:latest")
    with pytest.raises(PullError, match=r"refused access \(401\).*public models only"):
        ensure_registry(Store(), "smolreg")
    monkeypatch.setenv("TANDEM_OLLAMA_REGISTRY", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(RegistryUnreachableError, match="could not reach the registry"):
        resolve("smolreg")
    assert Store().list() == []


def test_cli_pull_then_run(home, registry):
    """`tandem pull NAME` shows a progress bar, "verifying", "success"; `tandem run` then
    answers from the store with llama.cpp's greedy continuation, without asking again."""
    env = {**os.environ, "TANDEM_HOST": "127.0.0.1:9"}
    cmd = [sys.executable, "-m", "runtime.cli.main"]
    res = subprocess.run(
        [*cmd, "pull", "smolreg"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "pulling manifest" in res.stderr and "98.4 MB/98.4 MB" in res.stderr, res.stderr
    assert re.search(r"\d [KMG]?B/s ETA", res.stderr), res.stderr  # a speed (1.1 GB/s here)
    assert "verifying sha256 digest" in res.stderr
    assert res.stdout.startswith("success: smolreg:latest"), res.stdout
    asked = len(registry.requests)
    prompt = "The capital of France is"
    run = [*cmd, "run", "smolreg", prompt, "--raw", "--temperature", "0", "--num-predict", "4"]
    res = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(" Paris"), res.stdout  # llama.cpp's greedy: " Paris."
    assert len(registry.requests) == asked
    res = subprocess.run([*cmd, "list"], env=env, capture_output=True, text=True, timeout=60)
    assert "smolreg:latest" in res.stdout
    res = subprocess.run(
        [*cmd, "pull", "nosuch"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "Error: model 'nosuch:latest' was not found on the registry" in res.stderr


def test_server_api_pull_with_the_ollama_client(home, registry):
    """`ollama.Client.pull` against `tandem serve` (a real uvicorn on loopback) pulls a registry
    name into the store: status lines ending in success, then the name in /api/tags."""
    ollama = pytest.importorskip("ollama", reason="ollama-python is in the test extra")
    from test_server import Server

    from runtime.server.app import create_app

    srv = Server(create_app())
    try:
        client = ollama.Client(host=srv.url)
        statuses = [part.status for part in client.pull("smolreg", stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
        assert "smolreg:latest" in [m.model for m in client.list().models]
        assert Store().get(ModelName.parse("smolreg")) is not None
        with pytest.raises(ollama.ResponseError) as err:
            client.pull("nosuch")
        assert err.value.status_code == 404
    finally:
        srv.stop()
