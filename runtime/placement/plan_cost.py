"""The planner's cost model: predicted decode and prompt tokens/s of a placement.

Decode is memory-bound, so one token costs, per device, the bytes it reads (every weight
once, the KV of the context so far, one row of token_embd) over that device's effective
bandwidth (measured bandwidth × the kernels' efficiency), plus a fixed cost per layer run
(op dispatch, kernel launches) and per hand-off of the hidden state between devices (link
latency + bytes over the link; the last hand-off carries the logits when the head is on
the GPU). Prompt processing is compute-bound: per token, 2 FLOPs per weight element and the
attention products over its context (the decode prediction's fill plus half a chunk), at
each device's rates, plus the weight reads and fixed costs shared by the num_batch tokens of
a chunk. The constants and how well the predictions match: docs/planner.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.placement.devices import Calibration, format_size
from runtime.placement.model_sizes import KV_RANK, ModelSizes, TensorSize

GPU, CPU = "gpu", "cpu"


@dataclass(frozen=True)
class Op:
    """One step of the forward pass on one device."""

    device: str
    layer: int | None
    kind: str  # "weights" | "kv" | "row" (the embedding lookup)
    read_bytes: float  # bytes read per decoded token
    weight_bytes: int  # weight bytes read once per forward pass (shared by a prefill chunk)
    flops: float  # per prompt token
    ggml_type: int | None = None  # a weight's type (its CPU matmul rate)
    act_bytes: float = 0.0  # activation bytes the layer's elementwise ops touch per token


@dataclass(frozen=True)
class Estimate:
    tokens_per_s: float
    seconds: dict  # per token: {"gpu reads": s, "cpu reads": s, "layers": s, "hand-offs": s}
    lines: tuple[str, ...]  # the reasoning, one line per term


@dataclass(frozen=True)
class Placement:
    """Where each tensor (by name), the head and each layer's KV live."""

    tensors: dict  # name → GPU | CPU
    head: str
    kv: tuple[str, ...]  # per layer


def _weights(t: TensorSize, device: str, layer: int | None, share: float = 1.0) -> Op:
    """A matmul (or norm) over tensor t: its bytes read, 2 FLOPs per element × share."""
    return Op(device, layer, "weights", t.nbytes, t.nbytes, 2.0 * t.n_elements * share, t.ggml_type)


def _experts(t: TensorSize, device: str, layer: int, active: float) -> Op:
    """A routed experts tensor: a decoded token reads and multiplies only the `active` share
    (experts used / experts); a prefill chunk reads the whole tensor once."""
    return Op(
        device,
        layer,
        "weights",
        t.nbytes * active,
        t.nbytes,
        2.0 * t.n_elements * active,
        t.ggml_type,
    )


def activation_bytes_per_token(sizes: ModelSizes) -> float:
    """Float32 bytes one layer's elementwise ops read and write per token: about ten passes
    over the hidden state (norms, residual adds, RoPE, quantizing inputs) and four over the
    FFN width (gate, up, their product, its quantization)."""
    c = sizes.config
    return 4.0 * (10 * c.n_embd + 4 * c.n_ff)


def forward_ops(
    sizes: ModelSizes, where: Placement, kv_read: list[float], chunk: int, context: list[float]
) -> list[Op]:
    """The forward pass as Ops in order: embedding row, each layer's tensors with its
    attention over the KV at KV_RANK, then the head (output_norm, output or tied token_embd).
    kv_read: per layer, bytes of its KV read per decoded token; chunk: prompt tokens per pass;
    context: per layer, the positions a prompt token attends to on average."""
    c = sizes.config
    row = sizes.embd.nbytes / c.vocab_size  # the lookup reads one row per token
    ops = [Op(CPU, None, "row", row, 0, 0.0)]
    act = activation_bytes_per_token(sizes)
    for i in range(c.n_layer):
        tensors = sizes.layer_tensors(i)
        active = c.n_expert_used / c.n_expert if c.n_expert else 1.0
        layer = [
            _experts(t, where.tensors[t.name], i, active)
            if t.group == "experts"
            else _weights(t, where.tensors[t.name], i)
            for t in tensors
        ]
        at = sum(t.rank < KV_RANK for t in tensors)
        attn_flops = 2.0 * c.n_head * (c.head_dim + c.head_dim_v) * context[i]
        layer.insert(at, Op(where.kv[i], i, "kv", kv_read[i], 0, attn_flops, act_bytes=act))
        ops += layer
    # logits are needed for the last token of a chunk only
    ops += [_weights(t, where.head, None, 1 / chunk) for t in sizes.head_tensors()]
    return ops


def _handoffs(ops: list[Op]) -> int:
    """Device changes along the pass, plus the logits' return when the pass ends on the GPU."""
    changes = sum(a.device != b.device for a, b in zip(ops, ops[1:], strict=False))
    return changes + (ops[-1].device == GPU)


def _layers_on(ops: list[Op], device: str) -> int:
    return len({op.layer for op in ops if op.device == device and op.layer is not None})


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _gbs(rate: float) -> str:
    return f"{rate / 1e9:.1f} GB/s"


def decode_estimate(sizes: ModelSizes, ops: list[Op], cal: Calibration, fill: int) -> Estimate:
    """Tokens/s of one sequence decoding at `fill` tokens of context."""
    lines, seconds = [], {}
    for dev, bw, eff, kv_eff, name in (
        (GPU, cal.vram_bw, cal.gpu_efficiency, cal.gpu_efficiency, "vram_bw"),
        (CPU, cal.ram_bw, cal.cpu_efficiency, cal.cpu_kv_efficiency, "ram_bw"),
    ):
        total = sum(op.read_bytes for op in ops if op.device == dev)
        kv = sum(op.read_bytes for op in ops if op.device == dev and op.kind == "kv")
        if total == 0:
            continue
        seconds[f"{dev} reads"] = (total - kv) / (bw * eff) + kv / (bw * kv_eff)
        how = (
            f"{_gbs(bw * eff)} ({eff:.0%} of {_gbs(bw)}, {cal.source(name)})"
            if eff == kv_eff
            else f"{_gbs(bw * eff)} ({eff:.0%} of {_gbs(bw)}, {cal.source(name)}), the KV "
            f"at {_gbs(bw * kv_eff)} (attention, {kv_eff:.0%})"
        )
        lines.append(
            f"{dev.upper()} reads {format_size(total)} per token ({format_size(kv)} "
            f"of it KV at {fill} tokens of context) at {how} = "
            f"{_ms(seconds[f'{dev} reads'])}"
        )
    n_gpu, n_cpu = _layers_on(ops, GPU), _layers_on(ops, CPU)
    seconds["layers"] = n_gpu * cal.gpu_layer_s + n_cpu * cal.cpu_layer_s
    lines.append(
        f"fixed costs: {n_gpu} GPU layers × {cal.gpu_layer_s * 1e6:.0f} µs + {n_cpu} "
        f"CPU layers × {cal.cpu_layer_s * 1e6:.0f} µs = {_ms(seconds['layers'])}"
    )
    hops = _handoffs(ops)
    c = sizes.config
    moved = 4 * c.n_embd * (hops - (ops[-1].device == GPU)) + 4 * c.vocab_size * (
        ops[-1].device == GPU
    )
    seconds["hand-offs"] = hops * cal.link_latency_s + moved / cal.h2d_bw
    if hops:
        lines.append(
            f"{hops} hand-offs between devices × {cal.link_latency_s * 1e6:.0f} µs "
            f"({cal.source('link_latency_s')}) + {format_size(moved)} at "
            f"{_gbs(cal.h2d_bw)} = {_ms(seconds['hand-offs'])}"
        )
    total = sum(seconds.values())
    lines.append(f"→ {_ms(total)} per token = {1 / total:.1f} tokens/s")
    return Estimate(1 / total, seconds, tuple(lines))


def _cpu_rate(op: Op, cal: Calibration) -> float:
    """The CPU's rate for an op: attention's (prefill SDPA), a weight type's measured native
    matmul rate, else the float32 matmul rate (types without a native panel kernel)."""
    if op.kind == "kv":
        return cal.cpu_attn_flops
    return cal.cpu_type_flops.get(str(op.ggml_type), cal.cpu_flops)


def prompt_estimate(sizes: ModelSizes, ops: list[Op], cal: Calibration, chunk: int) -> Estimate:
    """Tokens/s of prompt processing in chunks of `chunk` tokens."""
    lines, seconds = [], {}
    for dev, rate, bw, eff, name in (
        (GPU, cal.gpu_flops, cal.vram_bw, cal.gpu_efficiency, "gpu_flops"),
        (CPU, cal.cpu_flops, cal.ram_bw, cal.cpu_efficiency, "cpu_flops"),
    ):
        mine = [op for op in ops if op.device == dev]
        flops = sum(op.flops for op in mine)
        weights = sum(op.weight_bytes for op in mine)
        if flops == 0 and weights == 0:
            continue
        if dev == CPU:  # per type; and the elementwise ops, which the GPU's rate covers
            compute = sum(op.flops / _cpu_rate(op, cal) for op in mine)
            act = sum(op.act_bytes for op in mine) / (bw * cal.cpu_act_share)
            how = (
                f"the native kernels' rate per type ({cal.source('cpu_type_flops')}; "
                f"{flops / compute / 1e12:.2f} TFLOP/s here) + elementwise ops "
                f"{_ms(act)} ({cal.cpu_act_share:.0%} of {_gbs(bw)})"
            )
        else:
            compute, act = flops / rate, 0.0
            how = f"{rate / 1e12:.2f} TFLOP/s ({cal.source(name)})"
        seconds[f"{dev} compute"] = compute + act + weights / (bw * eff) / chunk
        lines.append(
            f"{dev.upper()}: {flops / 1e9:.3f} GFLOP per token at {how} + "
            f"{format_size(weights)} of weights read once per {chunk}-token chunk = "
            f"{_ms(seconds[f'{dev} compute'])}"
        )
    fixed = _layers_on(ops, GPU) * cal.gpu_layer_s + _layers_on(ops, CPU) * cal.cpu_layer_s
    hops = _handoffs(ops)
    seconds["layers and hand-offs"] = (fixed + hops * cal.link_latency_s) / chunk + (
        hops * 4 * sizes.config.n_embd / cal.h2d_bw
    )
    lines.append(
        f"fixed costs and {hops} hand-offs shared by the chunk = "
        f"{_ms(seconds['layers and hand-offs'])}"
    )
    total = sum(seconds.values())
    lines.append(f"→ {_ms(total)} per prompt token = {1 / total:.1f} tokens/s")
    return Estimate(1 / total, seconds, tuple(lines))
