"""The planner's decisions on synthetic size tables, its refusals, size parsing, and
`tandem plan smollm2 --gpu-memory 200MB --json` checked for internal consistency."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, replace

import pytest
import torch

from loaders.config import ModelConfig
from quant.errors import InvalidParameterError, PlanError
from runtime.cli.main import main
from runtime.placement.devices import Calibration, Devices, Gpu, parse_size
from runtime.placement.model_sizes import ModelSizes, kv_bytes_per_token_layer
from runtime.placement.plan_cost import CPU, GPU
from runtime.placement.planner import PlanRequest, plan

MB = 10**6
Q4_0, F32 = 2, 0


@dataclass(frozen=True)
class Sized:
    """A tensor-table entry: what ModelSizes reads of a GGUF TensorInfo."""

    nbytes: int
    ggml_type: int
    n_elements: int


def config(n_layer: int = 8, vocab: int = 32000, tied: bool = False) -> ModelConfig:
    return ModelConfig(
        arch="llama",
        n_layer=n_layer,
        n_embd=512,
        n_ff=1024,
        n_head=8,
        n_head_kv=2,
        head_dim=64,
        head_dim_v=64,
        n_ctx_train=4096,
        vocab_size=vocab,
        rms_eps=1e-5,
        rope_base=1e4,
        rope_base_swa=1e4,
        rope_scale=1.0,
        rope_neox=False,
        sliding_window=0,
        swa_layers=(False,) * n_layer,
        activation="silu",
        qk_norm=False,
        post_norms=False,
        embed_scale=1.0,
        attn_scale=0.125,
        tied_head=tied,
        attn_bias=False,
    )


def sizes(layer_mb: float, head_mb: float, n_layer: int = 8, tied: bool = False) -> ModelSizes:
    """A llama-shaped table: each layer's 7 matrices share layer_mb, the head has head_mb."""
    table = {"token_embd.weight": Sized(int(head_mb * MB), Q4_0, int(head_mb * MB * 1.8))}
    if not tied:
        table["output.weight"] = Sized(int(head_mb * MB), Q4_0, int(head_mb * MB * 1.8))
    table["output_norm.weight"] = Sized(2048, F32, 512)
    for i in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            share = int(layer_mb * MB / 7)
            table[f"blk.{i}.{name}.weight"] = Sized(share, Q4_0, int(share * 1.8))
        for name in ("attn_norm", "ffn_norm"):
            table[f"blk.{i}.{name}.weight"] = Sized(2048, F32, 512)
    return ModelSizes.from_tensors(config(n_layer, tied=tied), table)


# Pure byte costs: no fixed per-layer or per-hand-off cost, so decisions follow bytes alone.
BYTES_ONLY = Calibration(cpu_layer_s=0.0, gpu_layer_s=0.0, link_latency_s=0.0, h2d_bw=1e15)


def machine(gpu_bytes: int | None, ram: int = 64 << 30, cal: Calibration = BYTES_ONLY):
    gpus = () if gpu_bytes is None else (Gpu(0, "test GPU", gpu_bytes, gpu_bytes),)
    return Devices(gpus, ram, ram, 4, cal)


def small_request(**kw) -> PlanRequest:
    """A short context and chunk, so the KV and buffers are small beside the weights."""
    return PlanRequest(**{"num_ctx": 256, "num_batch": 32, **kw})


def test_large_head_goes_to_gpu_before_layers() -> None:
    # budget: the 60 MB head, or 4 of the 8 layers (14 MB each): the head is read whole every
    # token, 60 MB against 56 MB (+ their KV at 128 tokens, 0.3 MB) of layers
    s = sizes(layer_mb=14, head_mb=60)
    p = plan(s, machine(None), small_request(gpu_memory=66 * MB))
    assert p.placement.head == GPU and p.candidate.n_gpu == 0
    fill_layers = plan(s, machine(None), small_request(gpu_memory=66 * MB, num_gpu=4))
    assert fill_layers.placement.head == CPU  # 4 layers leave no room for the head
    assert p.decode.tokens_per_s > fill_layers.decode.tokens_per_s


def test_small_head_rides_along_with_the_layers() -> None:
    s = sizes(layer_mb=12, head_mb=6)
    p = plan(s, machine(None), small_request(gpu_memory=70 * MB))
    assert p.placement.head == GPU and p.candidate.n_gpu == 5  # 6 + 5·12 + KV, buffers
    assert p.memory[GPU].total <= 70 * MB
    assert p.placement.tensors["blk.2.ffn_up.weight"] == CPU  # the first layers stay
    assert p.placement.tensors["blk.3.ffn_up.weight"] == GPU


def test_kv_moves_to_ram_when_it_costs_more_vram_than_it_saves() -> None:
    # long context, little of it read (ctx_fill 16): no layer fits with its KV (16.8 MB),
    # all fit without; "as many layers as fit" with their KV would place none
    s = sizes(layer_mb=1, head_mb=1)
    kv_layer = 32768 * kv_bytes_per_token_layer(s.config, "f16")
    p = plan(
        s, machine(None), PlanRequest(num_ctx=32768, ctx_fill=16, num_batch=16, gpu_memory=12 * MB)
    )
    assert kv_layer > 12 * MB
    assert p.candidate.n_gpu == 8 and not p.candidate.kv_gpu
    assert p.memory[GPU].kv == 0 and p.memory[CPU].kv == 8 * kv_layer


def test_pins_keep_matching_tensors_on_the_cpu() -> None:
    s = sizes(layer_mb=12, head_mb=6)
    p = plan(s, machine(None), small_request(gpu_memory=10**12, pins=(r"blk\.[0-4]\.ffn_",)))
    assert p.candidate.n_gpu == 8  # everything else fits
    for name, dev in p.placement.tensors.items():
        m = re.match(r"blk\.(\d)\.(\w+)", name)
        if m:
            pinned = int(m.group(1)) <= 4 and m.group(2).startswith("ffn_")
            assert dev == (CPU if pinned else GPU), name
    unpinned = plan(s, machine(None), small_request(gpu_memory=10**12))
    moved = sum(
        t.nbytes
        for t in s.tensors
        if t.layer is not None and t.layer <= 4 and t.name.split(".")[2].startswith("ffn_")
    )
    assert unpinned.memory[GPU].weights - p.memory[GPU].weights == moved


def test_pinning_the_head_and_bad_pins() -> None:
    s = sizes(layer_mb=12, head_mb=6)
    p = plan(s, machine(None), small_request(gpu_memory=10**12, pins=("^output",)))
    assert p.placement.head == CPU and p.placement.tensors["output.weight"] == CPU
    with pytest.raises(InvalidParameterError, match="not a valid regular expression"):
        plan(s, machine(None), small_request(gpu_memory=10**12, pins=("blk.(",)))
    with pytest.raises(InvalidParameterError, match="matches no tensor"):
        plan(s, machine(None), small_request(gpu_memory=10**12, pins=("nothing_here",)))


def test_num_gpu_zero_and_all() -> None:
    s = sizes(layer_mb=12, head_mb=6)
    cpu_only = plan(s, machine(10**12), small_request(num_gpu=0))
    assert set(cpu_only.placement.tensors.values()) == {CPU} and cpu_only.memory[GPU].total == 0
    for n in (8, 999):  # 999: "all", as ollama users write it
        full = plan(s, machine(10**12), small_request(num_gpu=n))
        assert full.candidate.n_gpu == 8 and set(full.placement.kv) == {GPU}
        assert full.placement.head == GPU


def test_no_gpu_plans_cpu_only_and_refuses_gpu_layers() -> None:
    s = sizes(layer_mb=12, head_mb=6)
    assert plan(s, machine(None), small_request()).candidate.n_gpu == 0
    with pytest.raises(PlanError, match="--gpu-memory"):
        plan(s, machine(None), small_request(num_gpu=4))


def test_refusal_says_what_to_lower() -> None:
    s = sizes(layer_mb=12, head_mb=6)
    with pytest.raises(PlanError) as err:
        plan(s, machine(None), small_request(gpu_memory=50 * MB, num_gpu=8))
    most = int(re.search(r"lower num_gpu to at most (\d+)", str(err.value)).group(1))
    assert "GPU memory" in str(err.value) and "num_ctx" in str(err.value)
    plan(s, machine(None), small_request(gpu_memory=50 * MB, num_gpu=most))  # fits
    with pytest.raises(PlanError):
        plan(s, machine(None), small_request(gpu_memory=50 * MB, num_gpu=most + 1))
    # RAM: 4 sequences of 128k context need GBs of KV
    with pytest.raises(PlanError, match=r"of RAM .* lower num_ctx or num_parallel"):
        plan(s, machine(None, ram=2 << 30), PlanRequest(num_ctx=131072, num_parallel=4))


def test_kv_type_q8_0_takes_34_bytes_per_32_values() -> None:
    s = sizes(layer_mb=12, head_mb=6)
    f16 = plan(s, machine(None), small_request()).memory[CPU].kv
    q8 = plan(s, machine(None), small_request(kv_type="q8_0")).memory[CPU].kv
    assert q8 * 64 == f16 * 34
    with pytest.raises(InvalidParameterError, match="f16, q8_0"):
        plan(s, machine(None), small_request(kv_type="q4"))


def test_cpu_decode_time_is_bytes_over_bandwidth_plus_fixed_costs() -> None:
    s = sizes(layer_mb=12, head_mb=6)
    cal = replace(
        Calibration(), ram_bw=10e9, cpu_efficiency=0.5, cpu_kv_efficiency=0.25, cpu_layer_s=1e-4
    )
    req = small_request(ctx_fill=100)
    p = plan(s, machine(None, cal=cal), req)
    kv = 8 * 100 * kv_bytes_per_token_layer(s.config, "f16")
    weights = sum(t.nbytes for t in s.tensors if t.name != "token_embd.weight")
    row = s.embd.nbytes / s.config.vocab_size
    expected = (weights + row) / 5e9 + kv / 2.5e9 + 8 * 1e-4  # the KV at attention's rate
    assert p.decode.tokens_per_s == pytest.approx(1 / expected, rel=1e-9)


def test_sliding_window_layers_read_at_most_their_window_of_kv() -> None:
    s = sizes(layer_mb=12, head_mb=6, n_layer=4)
    swa = dataclasses.replace(
        s,
        config=dataclasses.replace(
            s.config, sliding_window=64, swa_layers=(True, True, False, True)
        ),
    )
    per = kv_bytes_per_token_layer(s.config, "f16")
    cal = replace(BYTES_ONLY, ram_bw=10e9, cpu_efficiency=0.5, cpu_kv_efficiency=0.5)
    full = plan(s, machine(None, cal=cal), small_request(ctx_fill=200))
    windowed = plan(swa, machine(None, cal=cal), small_request(ctx_fill=200))
    saved = (3 * (200 - 64) * per) / 5e9  # three windowed layers read 64 positions, not 200
    assert 1 / full.decode.tokens_per_s - 1 / windowed.decode.tokens_per_s == pytest.approx(
        saved, rel=1e-6
    )


def test_cpu_prompt_time_uses_each_types_rate_and_the_elementwise_ops() -> None:
    """Per prompt token on the CPU: weight FLOPs at their type's measured native rate (Q4_0
    here), attention FLOPs over the context (the decode fill, num_ctx / 2, plus half a chunk)
    at attention's rate, the norms at the float32 rate, the layers' activation bytes at
    cpu_act_share of ram_bw, and the weights read once per chunk."""
    from runtime.placement.plan_cost import activation_bytes_per_token

    s = sizes(layer_mb=12, head_mb=6)
    cal = replace(
        BYTES_ONLY,
        ram_bw=10e9,
        cpu_efficiency=0.5,
        cpu_flops=1e11,
        cpu_type_flops={str(Q4_0): 4e11},
        cpu_act_share=0.25,
        cpu_attn_flops=5e10,
    )
    req = small_request()
    p = plan(s, machine(None, cal=cal), req)
    c, chunk = s.config, req.num_batch
    blocks = [t for t in s.tensors if t.layer is not None and t.ggml_type == Q4_0]
    head = s.named("output.weight")
    weight_flops = sum(2.0 * t.n_elements for t in blocks) + 2.0 * head.n_elements / chunk
    norm_flops = sum(2.0 * t.n_elements for t in s.tensors if t.ggml_type == F32) - 2.0 * s.named(
        "output_norm.weight"
    ).n_elements * (1 - 1 / chunk)
    context = req.num_ctx / 2 + chunk / 2
    attn = c.n_layer * 2.0 * c.n_head * (c.head_dim + c.head_dim_v) * context
    read = sum(t.nbytes for t in s.tensors if t.name != "token_embd.weight")
    expected = (
        weight_flops / 4e11
        + attn / 5e10
        + norm_flops / 1e11
        + c.n_layer * activation_bytes_per_token(s) / 2.5e9
        + read / 5e9 / chunk
    )
    assert 1 / p.prompt.tokens_per_s == pytest.approx(expected, rel=1e-6)
    slower = plan(s, machine(None, cal=replace(cal, cpu_type_flops={})), req)
    assert slower.prompt.tokens_per_s < p.prompt.tokens_per_s  # Q4_0 at the float32 rate


@pytest.mark.parametrize(
    "text,expected",
    [
        ("6GB", 6 * 10**9),
        ("6GiB", 6 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5 GB", 1_500_000_000),
        ("200MB", 200 * 10**6),
        ("4096", 4096),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["6XB", "GB", "-1GB", "6 G B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidParameterError, match="6GiB"):
        parse_size(text)


def test_plan_command_json_is_consistent(smollm2_path, capsys) -> None:
    assert main(["plan", "smollm2", "--gpu-memory", "200MB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mem, budget = out["memory"], out["budgets"]
    assert budget["gpu"] == 200 * 10**6 and mem["gpu"]["total"] <= budget["gpu"]
    assert mem["gpu"]["total"] == sum(mem["gpu"][k] for k in ("weights", "kv", "buffers"))
    from loaders.gguf_file import GGUFFile

    with GGUFFile(smollm2_path) as g:
        nbytes = {name: info.nbytes for name, info in g.tensors.items()}
    assert set(out["tensors"]) == set(nbytes)
    on_gpu = sum(nbytes[n] for n, d in out["tensors"].items() if d == "gpu")
    head_copy = nbytes["token_embd.weight"] if out["head"] == "gpu" else 0  # tied head
    assert mem["gpu"]["weights"] == on_gpu + head_copy
    layers = out["layers"]
    assert len(layers) == out["n_layer"] == 30
    assert out["num_gpu_layers"] == sum(r["attn"] == "gpu" for r in layers)
    kv_layers = sum(r["kv"] == "gpu" for r in layers)
    per_layer = 4096 * 3 * (64 + 64) * 2  # num_ctx × n_head_kv × (K + V head sizes) × f16
    assert (mem["gpu"]["kv"], mem["cpu"]["kv"]) == (
        kv_layers * per_layer,
        (30 - kv_layers) * per_layer,
    )
    fitting = [r for r in out["sweep"] if r["fits"]]
    best = max(r["decode_tokens_per_s"] for r in fitting)
    assert out["predicted"]["decode_tokens_per_s"] == pytest.approx(best)
    assert out["predicted"]["decode_reasoning"][-1].endswith("tokens/s")


def test_plan_command_text(smollm2_path, capsys) -> None:
    assert main(["plan", "smollm2", "--gpu-memory", "6GB", "--num-ctx", "2048"]) == 0
    text = capsys.readouterr().out
    assert "30 of 30 layers on the GPU" in text and "decode:" in text and "ram_bw" in text
    if not torch.cuda.is_available():
        assert main(["plan", "smollm2", "--num-gpu", "40"]) == 1  # no GPU, no --gpu-memory
        assert "--gpu-memory" in capsys.readouterr().err


def test_calibration_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    from runtime.placement import devices

    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(devices, "measure_ram_bw", lambda: calls.append("ram") or 17e9)
    monkeypatch.setattr(devices, "measure_cpu_flops", lambda: calls.append("cpu") or 3e11)
    monkeypatch.setattr(devices, "measure_cpu_type_flops", lambda: {"2": 6e11})
    monkeypatch.setattr(devices, "measure_cpu_attn_flops", lambda: 9e10)
    first = devices.calibrate(gpus=())
    assert (first.ram_bw, first.cpu_flops) == (17e9, 3e11) and calls == ["ram", "cpu"]
    assert first.source("ram_bw") == "measured" and first.source("vram_bw") == "assumed"
    again = devices.calibrate(gpus=())
    assert again == first and calls == ["ram", "cpu"]  # read from the cache
    devices.calibrate(gpus=(), force=True)
    assert calls == ["ram", "cpu"] * 2
    (tmp_path / "calibration.json").write_text("{not json")
    assert devices.calibrate(gpus=()).ram_bw == 17e9 and len(calls) == 6  # re-measured


def test_cached_calibration_keeps_measurements_not_assumptions(tmp_path, monkeypatch) -> None:
    """An assumed constant saved by an older version (here cpu_efficiency 0.7) gives way to
    today's; measured figures are kept."""
    import json

    from runtime.placement import devices

    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    monkeypatch.setattr(devices, "measure_ram_bw", lambda: 17e9)
    monkeypatch.setattr(devices, "measure_cpu_flops", lambda: 3e11)
    monkeypatch.setattr(devices, "measure_cpu_type_flops", lambda: {"2": 6e11})
    monkeypatch.setattr(devices, "measure_cpu_attn_flops", lambda: 9e10)
    devices.calibrate(gpus=())
    path = tmp_path / "calibration.json"
    saved = json.loads(path.read_text())
    saved["calibration"]["cpu_efficiency"] = 0.7
    path.write_text(json.dumps(saved))
    cal = devices.calibrate(gpus=())
    assert cal.ram_bw == 17e9 and cal.cpu_efficiency == devices.Calibration().cpu_efficiency
    assert cal.cpu_type_flops == {"2": 6e11} and cal.source("cpu_type_flops") == "measured"
