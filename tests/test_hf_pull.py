"""Pulling `hf.co/USER/REPO[:QUANT]` with huggingface_hub against a loopback server that speaks
the hub's protocol (tests/hub_server.py), serving the real SmolLM2 GGUF from the test cache in
place: a pull that registers a runnable model, a cut connection resumed by the next pull, a
corrupted file refused, a split GGUF set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_split import split_gguf
from hub_server import Hub, HubFile

from loaders.blobs import sha256_file
from loaders.hf_pull import HfRef, choose, parse_ref
from loaders.hf_pull import HubFile as Listed
from loaders.pull import KNOWN
from modelfiles.hf_models import ensure_hf
from modelfiles.names import ModelName
from modelfiles.resolver import resolve
from modelfiles.store import Store
from quant.errors import ModelNotFoundError, PullError

REPO_ID = "TestUser/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA = KNOWN["smollm2"].sha256


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the loopback hub is what is tested
    return tmp_path / "home"


@pytest.fixture
def hub(smollm2_blob, monkeypatch):
    files = {FILE: HubFile(smollm2_blob, SHA, smollm2_blob.stat().st_size)}
    with Hub(REPO_ID, files) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_parse_and_choose():
    assert parse_ref("hf.co/u/r:q4_k_m") == HfRef("u/r", "q4_k_m")
    assert parse_ref("huggingface.co/u/r") == HfRef("u/r", None)
    with pytest.raises(ModelNotFoundError, match="hf.co/USER/REPO"):
        parse_ref("hf.co/onlyone")
    files = [Listed(f"m-{q}.gguf", 1, "0" * 64) for q in ("Q8_0", "Q4_K_M", "IQ2_XS")]
    assert choose(files, HfRef("u/r", None))[0] == "Q4_K_M"
    assert choose(files, HfRef("u/r", "q8_0"))[1][0].path == "m-Q8_0.gguf"
    with pytest.raises(ModelNotFoundError, match="IQ2_XS, Q4_K_M, Q8_0"):
        choose(files, HfRef("u/r", "Q5_K_S"))
    split = [Listed(f"q/m-Q2_K-0000{i}-of-00003.gguf", 1, "0" * 64) for i in (3, 1, 2)]
    picked = choose(split, HfRef("u/r", None))
    assert picked[0] == "Q2_K"
    assert [f.path for f in picked[1]] == [f"q/m-Q2_K-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        choose(split[:2], HfRef("u/r", None))


def test_pull_registers_and_resolves(home, hub):
    name, manifest = ensure_hf(Store(), f"hf.co/{REPO_ID}")
    assert str(name) == "hf.co/testuser/smollm2-135m-instruct-gguf:q4_1"
    assert manifest.model.digest == f"sha256:{SHA}"
    blob = home / "models" / "blobs" / f"sha256-{SHA}"
    assert blob.is_file() and not list(blob.parent.glob("*.download"))
    listed = {str(n) for n, _ in Store().list()}
    assert listed == {str(name), "hf.co/testuser/smollm2-135m-instruct-gguf:latest"}
    served = hub.served
    spec = resolve(f"hf.co/{REPO_ID}:Q4_1")  # stored now: no network
    assert spec.path == blob and hub.served == served
    # the redirect to the CDN was followed and the hub's metadata asked for with HEAD
    assert any(m == "HEAD" and "/resolve/" in p for m, p, _ in hub.requests)
    assert any(m == "GET" and p.startswith("/cdn/") for m, p, _ in hub.requests)


def test_cut_connection_resumes(home, hub):
    size = hub.files[FILE].size
    hub.cut_after = 40_000_000
    with pytest.raises(PullError, match="run the pull again to resume"):
        ensure_hf(Store(), f"hf.co/{REPO_ID}:Q4_1")
    partial = home / "models" / "blobs" / f"sha256-{SHA}.download"
    kept = partial.stat().st_size  # what reached the disk (huggingface_hub writes 10 MiB chunks)
    assert 20_000_000 < kept <= 40_000_000
    hub.down = False
    ensure_hf(Store(), f"hf.co/{REPO_ID}:Q4_1")
    # only the bytes not yet on disk were sent again, asked for with a Range request
    assert hub.served == size + (40_000_000 - kept)
    assert ("GET", f"/cdn/{SHA}", f"bytes={kept}-") in hub.requests
    assert not partial.exists()
    assert Store().get(ModelName.parse(f"hf.co/{REPO_ID}:q4_1")) is not None


def test_corrupted_file_refused(home, hub):
    hub.corrupt = True
    with pytest.raises(PullError, match="not .* as the hub lists; the file was deleted"):
        ensure_hf(Store(), f"hf.co/{REPO_ID}")
    blobs = home / "models" / "blobs"
    assert not list(blobs.glob("sha256-*"))
    assert Store().list() == []


def test_cli_pull_then_run(home, hub, tmp_path):
    """`tandem pull` shows a progress bar, "verifying", "success"; `tandem run` then answers
    from the store with llama.cpp's greedy continuation, without asking the hub again."""
    # TQDM_POSITION=-1: huggingface_hub draws its bar on a pipe too (else only on a terminal)
    env = {**os.environ, "TANDEM_HOST": "127.0.0.1:9", "TQDM_POSITION": "-1"}
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "0"
    cmd = [sys.executable, "-m", "runtime.cli.main"]
    ref = f"hf.co/{REPO_ID}:q4_1"
    res = subprocess.run([*cmd, "pull", ref], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "verifying sha256 digest" in res.stderr and "MB/s" in res.stderr, res.stderr
    assert res.stdout.startswith("success: hf.co/testuser/smollm2-135m-instruct-gguf:q4_1")
    served = hub.served
    prompt = "The capital of France is"
    run = [*cmd, "run", ref, prompt, "--raw", "--temperature", "0", "--num-predict", "4"]
    res = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(" Paris"), res.stdout  # llama.cpp's greedy: " Paris."
    assert hub.served == served
    res = subprocess.run([*cmd, "list"], env=env, capture_output=True, text=True, timeout=60)
    assert "hf.co/testuser/smollm2-135m-instruct-gguf:q4_1" in res.stdout


def test_split_set_pulled_and_merged(home, smollm2_blob, tmp_path, monkeypatch):
    """SmolLM2 split in 3 by gguf-py's writer (as convert_hf_to_gguf --split-max-tensors does):
    all three are pulled and merged into one GGUF identical, byte for byte, to the original."""
    shards = split_gguf(smollm2_blob, tmp_path / "SmolLM2-Q4_1", 100)
    assert [p.name[-19:] for p in shards] == [f"0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    files = {p.name: HubFile(p, sha256_file(p), p.stat().st_size) for p in shards}
    with Hub(REPO_ID, files) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        name, manifest = ensure_hf(Store(), f"hf.co/{REPO_ID}")
        assert server.served == sum(f.size for f in files.values())
    assert str(name) == "hf.co/testuser/smollm2-135m-instruct-gguf:q4_1"
    assert manifest.model.digest == f"sha256:{SHA}"  # the original file, rebuilt
    blobs = home / "models" / "blobs"
    assert all((blobs / f"sha256-{f.sha256}").is_file() for f in files.values())


_SCALE = {576: 4608, 1536: 12288, 192: 1536}  # SmolLM2's widths x8: a 4.5 GB llama
_WIDER = {
    "llama.embedding_length": 4608,
    "llama.feed_forward_length": 12288,
    "llama.attention.head_count": 72,
    "llama.attention.head_count_kv": 24,
}


def sparse_big_gguf(src: Path, dst: Path) -> int:
    """SmolLM2's metadata and tensor names with every width x8 (4.5 GB of Q4_1 weights): the
    header written for real, the weights a hole (a sparse file). Returns its size."""
    import gguf
    import numpy as np

    from loaders.gguf_file import GGUFFile
    from modelfiles.gguf_merge import copy_metadata

    with GGUFFile(src) as source:
        writer = gguf.GGUFWriter(str(dst), "llama")
        copy_metadata(source, writer, ("general.architecture", "general.alignment", *_WIDER))
        for key, value in _WIDER.items():
            writer.add_uint32(key, value)
        total = 0
        for info in source.tensors.values():
            shape = [_SCALE.get(d, d) for d in info.shape]
            qtype = gguf.GGMLQuantizationType(info.ggml_type)
            block, nb = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * nb
            total += -(-nbytes // 32) * 32
            writer.add_tensor_info(
                info.name, list(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
    start = -(-dst.stat().st_size // 32) * 32
    os.truncate(dst, start + total)
    return start + total


def test_plan_reads_only_the_header(home, smollm2_blob, tmp_path, monkeypatch):
    """What `tandem plan hf.co/...` plans from, for a 4.5 GB (sparse) GGUF: its config and
    tensor sizes, read with Range requests totalling under 2 MB (the header is 1.79 MB)."""
    from loaders.config import ModelConfig
    from loaders.hf_pull import remote_headers
    from runtime.placement.model_sizes import ModelSizes

    big = tmp_path / "Big-Q4_1.gguf"
    size = sparse_big_gguf(smollm2_blob, big)
    assert size > 4e9
    files = {big.name: HubFile(big, "ab" * 32, size)}  # never downloaded: no hash needed
    with Hub(REPO_ID, files) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        metadata, tensors, read = remote_headers(f"hf.co/{REPO_ID}:Q4_1")
        served = server.served
        ranges = [r for m, p, r in server.requests if m == "GET" and p.startswith("/cdn/")]
    assert read == served < 2_000_000, (read, served)
    assert ranges[0] == "bytes=0-131071" and len(ranges) == 14
    config = ModelConfig.from_metadata(metadata, tensors.keys())
    assert config.n_embd == 4608 and config.n_layer == 30
    sizes = ModelSizes.from_tensors(config, tensors)
    assert sum(t.nbytes for t in tensors.values()) > 4e9 and sizes is not None
    assert not (home / "models" / "blobs").exists() or not any(
        (home / "models" / "blobs").iterdir()
    )
