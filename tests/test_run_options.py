"""RunOptions: settings resolved once (defaults ▸ server flags ▸ Modelfile ▸ flags ▸ the
model's trained context) and handed to the planner and the engine by `tandem run`, `serve`
and `plan`; each default written once in the packages."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from test_store import write_tiny_llama

from modelfiles.parameters import default
from quant.errors import InvalidParameterError
from runtime import loaded_model
from runtime.cli import main as cli
from runtime.run_options import RunOptions
from runtime.server.errors import RequestFieldError
from runtime.server.models import ModelRegistry, RegistryOptions
from runtime.server.ollama_options import parse_options

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "modelfiles", "loaders", "kernels", "quant")


def test_layers_in_order_later_wins():
    base = {"num_ctx": 1000, "kv_cache_type": "q8_0", "temperature": 0.1}
    modelfile = {"num_ctx": 2000, "temperature": 0.2, "num_thread": 3}
    flags = {"temperature": 0.3, "num_batch": 64}
    o = RunOptions.resolve(modelfile, flags, base)
    assert (o.num_ctx, o.kv_cache_type, o.num_thread, o.num_batch) == (2000, "q8_0", 3, 64)
    assert o.sampling.temperature == 0.3 and o.sampling.top_k == default("top_k")
    assert RunOptions.resolve({}, {"num_ctx": None}).num_ctx == default("num_ctx")


def test_defaults_come_from_the_table():
    o = RunOptions()
    assert (o.num_ctx, o.num_parallel, o.max_num_seqs, o.num_batch) == tuple(
        default(n) for n in ("num_ctx", "num_parallel", "max_num_seqs", "num_batch")
    )
    e = o.engine_options()
    assert (e.num_ctx, e.num_parallel, e.max_num_seqs, e.max_step_tokens) == (
        o.num_ctx,
        o.num_parallel,
        o.max_num_seqs,
        o.num_batch,
    )


def test_trained_context_clamps():
    o = RunOptions.resolve({"num_ctx": 10**6})
    assert o.for_model(8192).num_ctx == 8192 and o.for_model(10**7) is o


@pytest.mark.parametrize(
    "layer, words",
    [
        ({"no_such": 1}, "unknown option"),
        ({"num_ctx": 0}, "num_ctx"),
        ({"num_ctx": "big"}, "integer"),
        ({"kv_cache_type": "q4"}, "kv_cache_type"),
        ({"temperature": -1}, "temperature"),
        ({"pin": ["x=cuda:1"]}, "one GPU"),
        ({"mirostat": 2}, "not supported"),
    ],
)
def test_bad_settings_are_refused(layer, words):
    with pytest.raises(InvalidParameterError, match=words):
        RunOptions.resolve(flags=layer)


def test_pins_split_by_device_and_reach_the_plan_request():
    o = RunOptions.resolve({"pin": ["a=cpu", "b=gpu", "c=cuda:0"], "gpu_memory": 5})
    req = o.plan_request()
    assert (req.pins, req.gpu_pins, req.gpu_memory) == (("a",), ("b", "c"), 5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run_options") / "tiny.gguf"
    write_tiny_llama(path)
    return path


@pytest.fixture
def plans(monkeypatch):
    """The PlanRequest each load hands the placement."""
    seen = []
    real = loaded_model.planned

    def spy(request):
        seen.append(request)
        return real(request)

    monkeypatch.setattr(loaded_model, "planned", spy)
    return seen


def test_run_resolves_once_and_the_planner_sees_the_flags(smollm2_path, plans, monkeypatch, capsys):
    from modelfiles import resolver

    calls = []
    real = resolver.resolve
    monkeypatch.setattr(resolver, "resolve", lambda ref: calls.append(ref) or real(ref))
    monkeypatch.setattr(loaded_model, "resolve_spec", lambda ref: calls.append(ref) or real(ref))
    args = ["run", str(smollm2_path), "ab", "--num-predict", "1", "--num-ctx", "64"]
    assert cli.main([*args, "--kv-cache-type", "q8_0", "--num-batch", "16"]) == 0
    assert calls == [str(smollm2_path)]
    (req,) = plans
    assert (req.num_ctx, req.kv_type, req.num_parallel, req.num_batch) == (64, "q8_0", 1, 16)
    assert capsys.readouterr().out


def test_plan_sees_the_flags(smollm2_path, tiny, capsys):
    args = ["plan", str(smollm2_path), "--num-ctx", "64", "--kv-cache-type", "q8_0"]
    assert cli.main([*args, "--num-batch", "8", "--json"]) == 0
    req = json.loads(capsys.readouterr().out)["request"]
    assert (req["num_ctx"], req["kv_type"], req["num_batch"]) == (64, "q8_0", 8)
    assert cli.main(["plan", str(tiny), "--json"]) == 0  # the trained context clamps
    assert json.loads(capsys.readouterr().out)["request"]["num_ctx"] == 256


def test_serve_flags_are_the_defaults_a_modelfile_overrides(tiny, plans):
    registry = ModelRegistry(RegistryOptions(num_ctx=64, kv_cache_type="q8_0", max_num_seqs=3))
    lm = registry._load_model(str(tiny))
    assert (lm.options.num_ctx, lm.options.kv_cache_type, lm.options.max_num_seqs) == (
        64,
        "q8_0",
        3,
    )
    assert (plans[0].num_ctx, plans[0].kv_type) == (64, "q8_0")
    with pytest.raises(InvalidParameterError, match="kv_cache_type"):
        RegistryOptions(kv_cache_type="q4").settings()


def test_a_request_may_restate_load_options_but_not_change_them():
    loaded = RunOptions.resolve({"num_thread": 2})
    parse_options({"num_thread": 2, "num_batch": default("num_batch")}).check_loaded(loaded)
    with pytest.raises(RequestFieldError, match="num_thread=4 differs .* Modelfile"):
        parse_options({"num_thread": 4}).params(loaded.sampling, loaded)
    for bad in ({"use_mmap": False}, {"penalize_newline": False}):
        with pytest.raises(RequestFieldError):
            parse_options(bad)
    # a Modelfile-only setting is not a request option: ignored as ollama ignores unknown
    # options, and named in the response header (runtime/server/lenient.py)
    assert parse_options({"pin": "x=cpu"}).params(loaded.sampling, loaded) is not None


# ---- each default written once -----------------------------------------------------------

# 4096s that are not a context length: a matrix size and a measurement note
NOT_A_DEFAULT = {
    ("loaders/config.py", '"attention.sliding_window", 4096'),  # gemma2's window (llama.cpp's)
    ("runtime/models/gemma2.py", "sliding window (4096)"),
    ("runtime/engine/embedder.py", "CHUNK_TOKENS = 4096"),  # tokens one embedding forward packs
    ("runtime/placement/devices.py", "randn(4096, 4096"),
    ("runtime/placement/devices.py", "4096**3"),
}
NOT_A_DEFAULT |= {("quant/dequant.py", "(4096, 4096)")}


def package_lines() -> list[tuple[str, int, str]]:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGES],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    out = []
    for name in files:
        path = REPO / name
        if path.suffix == ".py" and path.is_file():
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                out.append((name, i, line))
    return out


def test_the_default_context_is_written_once():
    hits = [
        (f, i, line)
        for f, i, line in package_lines()
        if re.search(r"\b4096\b", line)
        and not any(f == nf and s in line for nf, s in NOT_A_DEFAULT)
    ]
    assert [f for f, _, _ in hits] == ["modelfiles/parameters.py"], hits


def test_the_default_parallel_counts_are_written_once():
    literal = re.compile(
        r"(DEFAULT_NUM_PARALLEL|\bnum_parallel\b|\bmax_num_seqs\b|--parallel)\W[^#\n]*?"
        r"(=\s*|default=)\d"
    )
    hits = [
        (f, i, line)
        for f, i, line in package_lines()
        if literal.search(line) and "num_parallel: int = 1" not in line
    ]
    assert hits == []
    for mirror in (  # what the scan would catch
        "DEFAULT_NUM_PARALLEL = 4",
        "    num_parallel: int = 4  # the engine's default",
        "    max_num_seqs: int = 16",
        'serve.add_argument("--parallel", type=int, default=16)',
    ):
        assert literal.search(mirror), mirror
