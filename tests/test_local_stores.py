"""Models other tools keep, used in place (modelfiles/local_stores.py): an ollama store, a
Hugging Face hub cache and an LM Studio folder built in temporary folders as those tools lay
them out, each holding the real SmolLM2 GGUF of the test cache (linked there: it stands for
the user's own file). tandem finds them by name, lists them with their source, answers from
them, and never copies them into its store nor writes into the other tools' folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loaders.pull import KNOWN
from modelfiles.builder import create_model
from modelfiles.local_stores import models
from modelfiles.modelfile import Modelfile
from modelfiles.names import ModelName
from modelfiles.resolver import resolve
from modelfiles.store import Store
from quant.errors import InvalidParameterError, ModelNotFoundError, TandemError

SHA = KNOWN["smollm2"].sha256
HF_REPO = "TestUser/SmolLM2-135M-Instruct-GGUF"
LMS_REPO = "lmstudio-community/SmolLM2-135M-Instruct-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
PARAMS = {"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.2, "num_ctx": 2048}


def link(src: Path, dst: Path) -> None:
    """`dst` is the user's file: a hard link when the file system allows, else a symlink."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        dst.symlink_to(src)


def ollama_blob(root: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def ollama_store(root: Path, gguf: Path, name: str = "llama3.2", tag: str = "latest") -> Path:
    """ollama's layout: a Docker v2 manifest whose layers are the GGUF and the template,
    system, params and license layers `ollama create` writes."""
    link(gguf, root / "blobs" / f"sha256-{SHA}")
    media = "application/vnd.ollama.image."
    params = {**PARAMS, "mirostat": 2}  # not a value tandem takes: skipped with a warning
    layers = [
        {"mediaType": media + "model", "digest": f"sha256:{SHA}", "size": gguf.stat().st_size},
        {"mediaType": media + "template", **ollama_blob(root, TEMPLATE.encode())},
        {"mediaType": media + "system", **ollama_blob(root, b"You are terse.")},
        {"mediaType": media + "params", **ollama_blob(root, json.dumps(params).encode())},
        {"mediaType": media + "license", **ollama_blob(root, b"Apache-2.0")},
    ]
    config = ollama_blob(root, b'{"model_format":"gguf","model_family":"llama"}')
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
        "layers": layers,
    }
    path = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def hf_cache(hub: Path, gguf: Path) -> Path:
    """huggingface_hub's layout: snapshots/<commit>/FILE, a relative symlink into blobs/;
    beside it a vision projector and an unfinished split download (both left out)."""
    folder = hub / f"models--{HF_REPO.replace('/', '--')}"
    link(gguf, folder / "blobs" / SHA)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(f"../../blobs/{SHA}")
    (snapshot / "mmproj-SmolLM2-f16.gguf").symlink_to(f"../../blobs/{SHA}")
    (snapshot / "SmolLM2-Q8_0-00001-of-00002.gguf").symlink_to("../../blobs/gone")
    return folder / "blobs" / SHA


def lmstudio(root: Path, gguf: Path) -> Path:
    path = root / LMS_REPO / "SmolLM2-135M-Instruct-Q4_1.gguf"
    link(gguf, path)
    return path


def tree(*roots: Path) -> dict[str, tuple]:
    """Every entry under the folders with what would change if anything wrote there."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                st = os.lstat(os.path.join(folder, name))
                out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def stored_bytes(home: Path) -> int:
    """Bytes of the regular files under TANDEM_HOME/models (links not followed)."""
    total = 0
    for folder, _, files in os.walk(home / "models"):
        total += sum(os.lstat(os.path.join(folder, f)).st_size for f in files)
    return total


@pytest.fixture
def stores(home, smollm2_path, tmp_path, monkeypatch) -> dict[str, Path]:
    """The three stores, pointed at by their variables; tandem's own store empty; the hub
    unreachable (a lookup that fell through to a download would fail)."""
    roots = {s: tmp_path / s for s in ("ollama", "hub", "lmstudio")}
    for variable in ("TANDEM_LOCAL_STORES", "OLLAMA_MODELS", "HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TANDEM_OLLAMA_MODELS", str(roots["ollama"]))
    monkeypatch.setenv("TANDEM_HF_CACHE", str(roots["hub"]))
    monkeypatch.setenv("TANDEM_LMSTUDIO_MODELS", str(roots["lmstudio"]))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("TANDEM_HOST", "127.0.0.1:9")  # `tandem run` finds no server
    ollama_store(roots["ollama"], smollm2_path)
    hf_cache(roots["hub"], smollm2_path)
    lmstudio(roots["lmstudio"], smollm2_path)
    return roots


def same_file(a: Path, b: Path) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_dev == os.stat(b).st_dev


def test_each_store_resolves_in_place(stores, smollm2_path, home):
    spec = resolve("llama3.2")
    assert spec.source == "ollama" and spec.path == stores["ollama"] / "blobs" / f"sha256-{SHA}"
    assert same_file(spec.path, smollm2_path)
    assert spec.template == TEMPLATE and spec.system == "You are terse."
    assert spec.parameters == PARAMS  # mirostat 2 is not taken: left out
    assert resolve("LLAMA3.2:latest").path == spec.path  # names are case-insensitive

    for ref in (f"hf.co/{HF_REPO}:Q4_1", f"hf.co/{HF_REPO}", f"huggingface.co/{HF_REPO}:q4_1"):
        spec = resolve(ref)
        assert spec.source == "huggingface" and spec.path.name == SHA, ref
        assert same_file(spec.path, smollm2_path) and spec.template is None
    with pytest.raises(TandemError):  # not cached: pulled, and the hub is unreachable
        resolve(f"hf.co/{HF_REPO}:Q8_0")

    for ref in (LMS_REPO, f"{LMS_REPO.lower()}:q4_1", f"hf.co/{LMS_REPO}:Q4_1"):
        spec = resolve(ref)
        assert spec.source == "lmstudio" and same_file(spec.path, smollm2_path), ref
    assert stored_bytes(home) == 0  # nothing copied, nothing linked into tandem's store


def test_listing_names_and_sources(stores):
    found = {m.name: (m.source, m.size) for m in models()}
    size = (stores["ollama"] / "blobs" / f"sha256-{SHA}").stat().st_size
    assert found == {
        "llama3.2:latest": ("ollama", size),
        f"hf.co/{HF_REPO.lower()}:q4_1": ("huggingface", size),
        f"{LMS_REPO.lower()}:q4_1": ("lmstudio", size),
    }


def test_tandem_store_first_then_the_switches(stores, workdir, monkeypatch):
    name = ModelName.parse("llama3.2")
    create_model(Store(), name, Modelfile(from_=str(workdir / "tiny.gguf")), workdir)
    assert resolve("llama3.2").source is None  # tandem's own model of that name
    Store().remove(name)
    assert resolve("llama3.2").source == "ollama"
    monkeypatch.setenv("TANDEM_OLLAMA_MODELS", "off")
    with pytest.raises(ModelNotFoundError, match="not known"):
        resolve("llama3.2")
    assert resolve(f"hf.co/{HF_REPO}").source == "huggingface"
    monkeypatch.setenv("TANDEM_LOCAL_STORES", "lmstudio")
    assert resolve(f"hf.co/{LMS_REPO}").source == "lmstudio"
    with pytest.raises(TandemError):  # pulled: the hub is unreachable
        resolve(f"hf.co/{HF_REPO}")
    monkeypatch.setenv("TANDEM_LOCAL_STORES", "off")
    assert models() == []
    monkeypatch.setenv("TANDEM_LOCAL_STORES", "ollama,docker")
    with pytest.raises(InvalidParameterError, match="docker is not a source"):
        models()


def test_damaged_ollama_model_is_reported_not_repaired(stores, caplog):
    root = stores["ollama"]
    bad = root / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    gone = ollama_store(root, stores["ollama"] / "blobs" / f"sha256-{SHA}", "gone")
    manifest = json.loads(gone.read_text())
    manifest["layers"][0]["digest"] = "sha256:" + "0" * 64
    gone.write_text(json.dumps(manifest))
    before = tree(root)
    assert [m.name for m in models()] == ["llama3.2:latest", *_others()]
    assert "broken:latest" in caplog.text and "gone:latest" in caplog.text
    with pytest.raises(ModelNotFoundError, match="not an ollama manifest.*`ollama pull broken"):
        resolve("broken")
    with pytest.raises(ModelNotFoundError, match="sha256-0000.* is missing"):
        resolve("gone")
    assert tree(root) == before


def _others() -> list[str]:
    return [f"hf.co/{HF_REPO.lower()}:q4_1", f"{LMS_REPO.lower()}:q4_1"]


def test_server_accepts_and_lists_them(stores):
    from runtime.server.models import ModelRegistry
    from runtime.server.ollama_info import local_models

    registry = ModelRegistry()
    assert registry.reference("llama3.2") == "llama3.2:latest"
    assert registry.reference(f"hf.co/{HF_REPO}") == f"hf.co/{HF_REPO.lower()}:q4_1"
    assert registry.reference(f"{LMS_REPO}:Q4_1") == f"{LMS_REPO.lower()}:q4_1"
    tags = {t["name"]: t for t in local_models([])}
    assert set(tags) == {"llama3.2:latest", *_others()}
    assert tags["llama3.2:latest"]["digest"] == SHA
    assert tags["llama3.2:latest"]["details"]["family"] == "llama"


def test_show_and_pull(stores, capsys, home):
    from runtime.cli.main import main

    assert main(["pull", "llama3.2"]) == 0  # nothing to pull: it is used where it is
    assert "ollama's file" in capsys.readouterr().out and stored_bytes(home) == 0

    assert main(["show", "llama3.2", "--parameters"]) == 0
    assert capsys.readouterr().out.split("\n")[2].split() == ["temperature", "0.2"]
    assert main(["show", "llama3.2", "--template"]) == 0
    assert capsys.readouterr().out == TEMPLATE + "\n"
    assert main(["show", "llama3.2", "--modelfile"]) == 0
    out = capsys.readouterr().out
    assert f"FROM {stores['ollama'] / 'blobs' / f'sha256-{SHA}'}" in out and "SYSTEM" in out
    assert "ollama's model, used in place" in out
    assert main(["show", f"hf.co/{HF_REPO}:q4_1"]) == 0
    assert "architecture        llama" in capsys.readouterr().out
    assert main(["show", f"{LMS_REPO}", "--license"]) == 0
    assert main(["pull", f"hf.co/{HF_REPO}:Q4_1"]) == 0  # the hub is not asked
    assert "huggingface's file" in capsys.readouterr().out and stored_bytes(home) == 0


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runtime.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_cli_lists_and_answers_in_place(stores, home, smollm2_path):
    """`tandem list` shows the three with their source; `tandem run llama3.2` and
    `tandem run hf.co/...` answer (llama.cpp's greedy " Paris") from the other tools' files:
    tandem's store does not grow and the other tools' folders are untouched."""
    before = tree(*stores.values())
    res = cli("list", timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED", "SOURCE"]
    rows = {line.split()[0]: line.split()[-1] for line in lines[1:]}
    assert rows == {"llama3.2:latest": "ollama", _others()[0]: "huggingface"} | {
        _others()[1]: "lmstudio"
    }
    prompt = ["The capital of France is", "--raw", "--temperature", "0", "--num-predict", "4"]
    for ref in ("llama3.2", f"hf.co/{HF_REPO}:Q4_1"):
        res = cli("run", ref, *prompt)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(" Paris"), (ref, res.stdout, res.stderr)
    assert "in place" in res.stderr  # the loading line says whose file it is
    assert stored_bytes(home) < 1_000_000 < smollm2_path.stat().st_size
    assert tree(*stores.values()) == before
    res = cli("run", "llama3.2", "hi", "--ollama-models", "off", timeout=120)
    assert res.returncode == 1 and "not known" in res.stderr, res.stderr


def test_default_folders_follow_the_tools_variables(tmp_path, monkeypatch):
    from modelfiles.local_stores import FOLDER_ENV, folders

    for variable in (*FOLDER_ENV.values(), "TANDEM_LOCAL_STORES", "OLLAMA_MODELS"):
        monkeypatch.delenv(variable, raising=False)
    for variable in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert folders("ollama") == [tmp_path / ".ollama" / "models"]
    assert folders("huggingface") == [tmp_path / ".cache" / "huggingface" / "hub"]
    assert folders("lmstudio") == [
        tmp_path / ".lmstudio" / "models",
        tmp_path / ".cache" / "lm-studio" / "models",
    ]
    monkeypatch.setenv("OLLAMA_MODELS", "/srv/ollama")
    monkeypatch.setenv("HF_HOME", "/srv/hf")
    assert folders("ollama") == [Path("/srv/ollama")]
    assert folders("huggingface") == [Path("/srv/hf/hub")]
    monkeypatch.setenv("HF_HUB_CACHE", "/srv/hub")
    monkeypatch.setenv("TANDEM_OLLAMA_MODELS", "/mine")
    assert folders("huggingface") == [Path("/srv/hub")] and folders("ollama") == [Path("/mine")]
    monkeypatch.setenv("TANDEM_HF_CACHE", "off")
    assert folders("huggingface") == []
