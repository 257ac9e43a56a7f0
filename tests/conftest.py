"""Shared fixtures: the real models, pulled through tandem's own pull code, and the
llama.cpp reference fixtures from ../shared/fixtures."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures"
FIXTURE_FILES = {
    "smollm2": "smollm2-135m-q4_1.public.json",
    "gemma3": "gemma3-270m-q4_k_m.public.json",
    "qwen_coder": "qwen2.5-coder-0.5b-q4_k_m.public.json",
}
# Test names of the real models whose pull name is not a Python identifier.
PULL_NAMES = {"qwen_coder": "qwen2.5-coder:0.5b"}

# Models are pulled once into a cache the test runs share (TANDEM_TEST_HOME overrides).
os.environ.setdefault("TANDEM_HOME", os.environ.get("TANDEM_TEST_HOME", str(REPO / ".tandem-test")))
# Other tools' models on this machine (~/.ollama, the HF cache, LM Studio) stay out of the
# tests; tests/test_local_stores.py builds its own and turns the lookup on.
os.environ["TANDEM_LOCAL_STORES"] = "off"
# Nor does a name tandem's catalog lacks go to ollama's registry (tests/test_ollama_registry.py
# points TANDEM_OLLAMA_REGISTRY at its loopback registry).
os.environ["TANDEM_OLLAMA_REGISTRY"] = "off"
# One native-kernel build for every test, subprocesses and temporary TANDEM_HOMEs included.
os.environ.setdefault("TANDEM_BUILD_CACHE", str(Path(os.environ["TANDEM_HOME"]) / "build"))


def model_path(name: str) -> Path:
    from loaders.pull import pull

    return pull(PULL_NAMES.get(name, name))


def load_script(name: str):
    """scripts/NAME.py imported as a module NAME (registered in sys.modules: dataclasses
    look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fixture(name: str) -> dict:
    path = FIXTURES / FIXTURE_FILES[name]
    if not path.is_file():
        pytest.fail(f"reference fixture missing: {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def native():
    """This CPU's best native build (the one PackedLinear and Model use)."""
    from kernels import native_loader

    module = native_loader.load()
    if module is None:
        pytest.skip("the native kernel could not be built (no compiler?); see the log")
    return module


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return model_path("smollm2")


@pytest.fixture(scope="module")
def smollm2_blob() -> Path:
    """The real SmolLM2 file of the shared test cache, for the loopback hub and registry
    servers to serve from there (never copied); skipped when it has not been pulled."""
    from loaders.pull import KNOWN

    sha = KNOWN["smollm2"].sha256
    cache = Path(os.environ["TANDEM_HOME"]) / "models" / "blobs" / f"sha256-{sha}"
    if not cache.is_file():
        pytest.skip(
            f"the SmolLM2 blob is not in the test cache ({cache}); run `tandem pull smollm2`"
        )
    return cache


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return model_path("gemma3")


@pytest.fixture(scope="session")
def qwen_coder_path() -> Path:
    return model_path("qwen_coder")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing entirely: every gpu test is skipped below
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", params=["native", "avx2", "scalar"])
def isa_build(request):
    """The native extension built for this CPU, the AVX2 one (when the CPU's best is another)
    and the portable scalar one, each once per module."""
    from kernels import native_loader

    isa = native_loader.cpu_isa() if request.param == "native" else request.param
    if request.param == "avx2" and native_loader.cpu_isa() in ("avx2", "scalar"):
        pytest.skip("the native build is the AVX2 one here, or this CPU has no AVX2")
    module = native_loader.load(isa)
    if module is None:
        pytest.skip(f"the native {isa} kernel could not be built (no compiler?); see the log")
    return module


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty TANDEM_HOME for store tests (test_store.fresh_home)."""
    from test_store import fresh_home

    return fresh_home(tmp_path / "home", monkeypatch)


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A working folder holding tiny.gguf, a tiny random llama (test_store.write_tiny_llama)."""
    from test_store import write_tiny_llama

    d = tmp_path / "work"
    d.mkdir()
    write_tiny_llama(d / "tiny.gguf")
    return d


@pytest.fixture(autouse=True)
def torch_threads():
    """Each test starts with torch's thread count as the session found it: a forward leaves
    torch's own ops on one thread (kernels/thread_policy.py), which would slow later tests'
    torch reference math."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
