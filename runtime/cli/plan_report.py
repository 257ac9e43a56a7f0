"""What `tandem plan` shows: a Plan as a JSON-ready dict or as text — the device of each
layer and tensor group, memory per device against its budget, the predicted prompt and
decode tokens/s with the bytes-per-token reasoning, and the speeds they rest on. The KV
column is the attention layers' pages plus, for a hybrid model (qwen35), the recurrent
layers' fixed per-sequence state; `kv_state` says which is which."""

from __future__ import annotations

import json
from dataclasses import asdict

from runtime.kv.kv_pool import kv_bytes_per_token
from runtime.kv.recurrent_state import state_bytes_per_layer
from runtime.placement.devices import format_size
from runtime.placement.model_sizes import kv_slots
from runtime.placement.plan_cost import CPU, GPU
from runtime.placement.planner import Plan

_SPEEDS = ("ram_bw", "vram_bw", "h2d_bw", "cpu_flops", "gpu_flops", "link_latency_s")


def _group_device(plan: Plan, layer: int, group: str) -> str:
    """ "gpu", "cpu", or "gpu+cpu" when pins split the group."""
    devs = {
        plan.placement.tensors[t.name] for t in plan.sizes.layer_tensors(layer) if t.group == group
    }
    return "+".join(sorted(devs, reverse=True)) or "-"


def layer_rows(plan: Plan) -> list[dict]:
    return [
        {
            "index": i,
            "attn": _group_device(plan, i, "attn"),
            "kv": plan.placement.kv[i],
            "ffn": _group_device(plan, i, "ffn"),
            "experts": _group_device(plan, i, "experts"),
        }
        for i in range(plan.sizes.config.n_layer)
    ]


def kv_state(plan: Plan) -> dict:
    """The KV column's parts: the attention layers' pages for num_ctx × num_parallel (whole
    blocks), the recurrent layers' state (fixed per sequence, whatever the context), and the
    MTP blocks left unloaded."""
    c, req = plan.sizes.config, plan.request
    per_token = kv_bytes_per_token(c, req.kv_type)  # attention layers only
    slots = kv_slots(req.num_ctx, req.num_parallel)
    recurrent = sum(c.recurrent_layers)
    per_seq = recurrent * state_bytes_per_layer(c)
    return {
        "attention_layers": c.n_layer - recurrent,
        "kv_bytes_per_token": per_token,
        "kv_slots": slots,
        "kv_bytes": per_token * slots,
        "recurrent_layers": recurrent,
        "state_bytes_per_sequence": per_seq,
        "state_bytes": per_seq * req.num_parallel,
        "nextn_layers": c.n_layer_nextn,
        "nextn_bytes_unloaded": plan.sizes.nextn_bytes,
    }


def _kv_state_lines(plan: Plan) -> list[str]:
    k, req = kv_state(plan), plan.request
    lines = [
        f"  KV: {k['attention_layers']} attention layers, {format_size(k['kv_bytes_per_token'])}"
        f" per token × {k['kv_slots']} slots (num_ctx {req.num_ctx} × {req.num_parallel}) = "
        f"{format_size(k['kv_bytes'])}"
    ]
    if k["recurrent_layers"]:
        lines.append(
            f"  recurrent state: {k['recurrent_layers']} delta-net layers, "
            f"{format_size(k['state_bytes_per_sequence'])} per sequence whatever its context "
            f"× {req.num_parallel} = {format_size(k['state_bytes'])}"
        )
    if k["nextn_layers"]:
        lines.append(
            f"  MTP: {k['nextn_layers']} multi-token-prediction block(s), "
            f"{format_size(k['nextn_bytes_unloaded'])} in the file, not loaded (unused)"
        )
    return lines


def plan_dict(plan: Plan, model: str) -> dict:
    c, req, b = plan.sizes.config, plan.request, plan.budgets
    mem = {
        d: {**asdict(m), "total": m.total, "budget": budget}
        for d, m, budget in ((GPU, plan.memory[GPU], b.gpu), (CPU, plan.memory[CPU], b.ram))
    }
    cal = plan.calibration
    return {
        "model": model,
        "arch": c.arch,
        "n_layer": c.n_layer,
        "weight_bytes": plan.sizes.total_bytes,
        "request": {
            **asdict(req),
            "pins": list(req.pins),
            "gpu_pins": list(req.gpu_pins),
            "ctx_fill": req.fill,
        },
        "budgets": {"gpu": b.gpu, "gpu_note": b.gpu_note, "ram": b.ram, "ram_note": b.ram_note},
        "num_gpu_layers": plan.candidate.n_gpu,
        "head": plan.placement.head,
        "token_embd": CPU,
        "layers": layer_rows(plan),
        "tensors": dict(plan.placement.tensors),
        "memory": mem,
        "kv_state": kv_state(plan),
        "predicted": {
            "decode_tokens_per_s": plan.decode.tokens_per_s,
            "prompt_tokens_per_s": plan.prompt.tokens_per_s,
            "decode_seconds_per_token": plan.decode.seconds,
            "prompt_seconds_per_token": plan.prompt.seconds,
            "decode_reasoning": list(plan.decode.lines),
            "prompt_reasoning": list(plan.prompt.lines),
        },
        "calibration": {
            **{k: getattr(cal, k) for k in _SPEEDS},
            "cpu_type_flops": _type_rates(cal),
            "sources": {k: cal.source(k) for k in (*_SPEEDS, "cpu_type_flops")},
        },
        "sweep": plan.sweep,
        "moe_vs_layer_split": split_comparison(plan),
    }


def _devices(row: dict) -> tuple[str, str, str, str]:
    return row["attn"], row["kv"], row["ffn"], row["experts"]


def _layer_ranges(rows: list[dict]) -> list[str]:
    """Consecutive layers with the same devices, one line each."""
    lines, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or _devices(rows[i]) != _devices(rows[start]):
            r = rows[start]
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            experts = f" experts {r['experts']}" if r["experts"] != "-" else ""
            lines.append(
                f"  layers {span:<7} attn {r['attn']:<8} KV {r['kv']:<4} ffn {r['ffn']:<8}"
                + experts
            )
            start = i
    return lines


def _memory_lines(plan: Plan) -> list[str]:
    lines = [f"  {'':6}{'weights':>12}{'KV':>12}{'buffers':>12}{'total':>12}{'budget':>12}"]
    for dev, budget in ((GPU, plan.budgets.gpu), (CPU, plan.budgets.ram)):
        m = plan.memory[dev]
        cells = (m.weights, m.kv, m.buffers, m.total, budget)
        lines.append(f"  {dev.upper():6}" + "".join(f"{format_size(x):>12}" for x in cells))
    return lines


def split_comparison(plan: Plan) -> dict | None:
    """A mixture-of-experts model's best fitting MoE split (routed experts of layers i… on the
    CPU, the rest on the GPU) beside the best fitting layer split; None for a dense model."""
    if not plan.sizes.config.n_expert or not plan.budgets.gpu:
        return None
    fitting = [r for r in plan.sweep if r["fits"]]
    moe = [r for r in fitting if r["cpu_experts_from"] is not None]
    layer = [r for r in fitting if r["cpu_experts_from"] is None]

    def best(rows: list[dict]) -> dict | None:
        return max(rows, key=lambda r: r["decode_tokens_per_s"], default=None)

    return {"moe_split": best(moe), "layer_split": best(layer)}


def _split_lines(plan: Plan) -> list[str]:
    cmp = split_comparison(plan)
    if cmp is None:
        return []
    n = plan.sizes.config.n_layer
    lines = ["", "MoE split vs layer split (best fitting of each, predicted):"]
    m, la = cmp["moe_split"], cmp["layer_split"]
    if m:
        lines.append(
            f"  MoE split: all {n} layers on the GPU, experts of layers "
            f"{m['cpu_experts_from']}-{n - 1} on the CPU: decode "
            f"{m['decode_tokens_per_s']:.1f} tokens/s, prompt {m['prompt_tokens_per_s']:.1f} "
            f"tokens/s, GPU {format_size(m['gpu_bytes'])}"
        )
    else:
        lines.append("  MoE split: none fits")
    if la:
        lines.append(
            f"  layer split: last {la['num_gpu']} of {n} layers on the GPU: decode "
            f"{la['decode_tokens_per_s']:.1f} tokens/s, prompt {la['prompt_tokens_per_s']:.1f} "
            f"tokens/s, GPU {format_size(la['gpu_bytes'])}"
        )
    if m and la:
        lines.append(
            f"  → MoE split {m['decode_tokens_per_s'] / la['decode_tokens_per_s']:.2f}× the layer split's decode"
        )
    return lines


def plan_text(plan: Plan, model: str) -> str:
    c, req, b, cal = plan.sizes.config, plan.request, plan.budgets, plan.calibration
    lines = [
        f"{model}: {c.arch}, {c.n_layer} layers, {format_size(plan.sizes.total_bytes)} of "
        f"weights; num_ctx {req.num_ctx} × num_parallel {req.num_parallel}, KV {req.kv_type}",
        f"GPU budget {format_size(b.gpu)}: {b.gpu_note}",
        f"RAM budget {format_size(b.ram)}: {b.ram_note}",
        "",
        f"placement: {plan.candidate.n_gpu} of {c.n_layer} layers on the GPU"
        + (
            f" (routed experts of layers {plan.candidate.cpu_experts[0]}-"
            f"{plan.candidate.cpu_experts[1] - 1} on the CPU)"
            if plan.candidate.moe_split
            else ""
        )
        + ", head on the "
        f"{plan.placement.head.upper()}, token_embd lookup on the CPU",
        *_layer_ranges(layer_rows(plan)),
        "",
        "memory:",
        *_memory_lines(plan),
        *_kv_state_lines(plan),
        "",
        f"decode: {plan.decode.tokens_per_s:.1f} tokens/s predicted (one sequence)",
        *(f"  {line}" for line in plan.decode.lines),
        f"prompt: {plan.prompt.tokens_per_s:.1f} tokens/s predicted",
        *(f"  {line}" for line in plan.prompt.lines),
        *_split_lines(plan),
        "",
        "speeds: "
        + ", ".join(f"{k} {_speed(k, getattr(cal, k))} ({cal.source(k)})" for k in _SPEEDS),
    ]
    if cal.cpu_type_flops:
        lines.append(
            "CPU prompt matmuls (native, "
            + cal.source("cpu_type_flops")
            + "): "
            + ", ".join(
                f"{name} {rate / 1e12:.2f} TFLOP/s" for name, rate in _type_rates(cal).items()
            )
        )
    return "\n".join(lines)


def _type_rates(cal) -> dict[str, float]:
    """The CPU's measured matmul rate per GGML type, by the type's name."""
    from gguf import GGMLQuantizationType

    return {GGMLQuantizationType(int(t)).name: rate for t, rate in cal.cpu_type_flops.items()}


def _speed(name: str, value: float) -> str:
    if name.endswith("_bw"):
        return f"{value / 1e9:.1f} GB/s"
    if name.endswith("flops"):
        return f"{value / 1e12:.2f} TFLOP/s"
    return f"{value * 1e6:.0f} µs"


def _remote(model: str):
    """(metadata, tensors, parameters, name) of an hf.co model not in the store yet, read
    with HTTP range requests (no download); None for anything else."""
    import sys

    from loaders.hf_pull import is_hf_ref, remote_headers
    from modelfiles.hf_models import stored_name
    from modelfiles.store import Store

    if not is_hf_ref(model) or Store().get(stored_name(model)) is not None:
        return None
    metadata, tensors, read = remote_headers(model)
    print(f"read the GGUF header of {model} over HTTP: {read / 1e6:.2f} MB", file=sys.stderr)
    return metadata, tensors, {}, model


def run_plan_command(args) -> int:
    """`tandem plan`: plan the model for this machine (or a GPU of --gpu-memory) and print:
    the plan `tandem run` and `tandem serve` would make, from the same RunOptions (defaults
    ▸ the Modelfile's PARAMETERs ▸ these flags; --pin patterns add to the Modelfile's pins)."""
    from dataclasses import replace

    from loaders.config import ModelConfig
    from loaders.gguf_file import GGUFFile
    from modelfiles.resolver import resolve as resolve_spec
    from runtime.cli.flags import cli_size
    from runtime.placement.devices import detect
    from runtime.placement.model_sizes import ModelSizes
    from runtime.placement.planner import plan
    from runtime.run_options import RunOptions

    flags = {
        "num_ctx": args.num_ctx,
        "num_parallel": args.parallel,
        "num_gpu": args.num_gpu,
        "num_cpu_moe": args.num_cpu_moe,
        "kv_cache_type": args.kv_cache_type,
        "num_batch": args.num_batch,
        "gpu_memory": cli_size(args.gpu_memory, "--gpu-memory"),
    }
    RunOptions.resolve(flags=flags).plan_request().validate()  # before the pull or calibration
    remote = _remote(args.model)
    if remote is not None:  # hf.co/... not pulled yet: its header over HTTP ranges
        metadata, tensors, parameters, name = remote
        config = ModelConfig.from_metadata(metadata, tensors.keys())
        sizes = ModelSizes.from_tensors(config, tensors)
    else:
        spec = resolve_spec(args.model)
        parameters, name = spec.parameters, spec.name
        with GGUFFile(spec.path) as gguf:
            config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors.keys())
            sizes = ModelSizes.from_tensors(config, gguf.tensors)
    options = RunOptions.resolve(parameters, flags).for_model(config.n_ctx_train)
    request = options.plan_request()
    request = replace(request, pins=request.pins + tuple(args.pin))
    request.validate()
    devices = detect(recalibrate=args.recalibrate)
    if args.gpu_bandwidth:
        cal = devices.calibration
        cal = replace(
            cal, vram_bw=args.gpu_bandwidth * 1e9, sources={**cal.sources, "vram_bw": "given"}
        )
        devices = replace(devices, calibration=cal)
    if args.ram:
        ram = cli_size(args.ram, "--ram") or 0
        devices = replace(devices, ram_total=max(ram, devices.ram_total), ram_available=ram)
    if args.ram_bandwidth:
        cal = devices.calibration
        cal = replace(
            cal, ram_bw=args.ram_bandwidth * 1e9, sources={**cal.sources, "ram_bw": "given"}
        )
        devices = replace(devices, calibration=cal)
    result = plan(sizes, devices, request)
    print(json.dumps(plan_dict(result, name), indent=1) if args.json else plan_text(result, name))
    return 0
