"""The planner: which device each tensor and each layer's KV lives on, chosen to maximise the
predicted decode tokens/s within the memory budgets, before anything loads.

Candidates have llama.cpp's shape of split — the last n layers on the GPU (n = 0 … n_layer,
or exactly num_gpu) — and, for a mixture-of-experts model, the MoE split: every layer on the
GPU except the routed experts of layers i … n_layer−1, which stay in RAM on the CPU kernels
(i = 0 … n_layer; priced with the active experts' bytes only: plan_cost.py). num_cpu_moe N
(llama.cpp's --n-cpu-moe) fixes it to the experts of the first N layers. Two more choices: the head on the GPU or not, and the GPU layers'
KV in VRAM or in RAM (in RAM it frees VRAM for weights at the price of two hand-offs per
layer). Tensors matching a pin (a regular expression searched in the tensor name, as
llama.cpp's --override-tensor) stay on the CPU in every candidate; those matching a GPU pin
go to the GPU in every candidate (refused when there is no GPU budget). Each candidate's memory
per device is counted (weights, KV for num_ctx × num_parallel, compute buffers) and its
speed predicted by runtime/placement/plan_cost.py; the fastest that fits wins. None fitting raises
PlanError with the numbers and what to lower.

    memory per device = weights placed there + KV of the layers whose KV is there
                        + compute buffers (activations of a num_batch chunk, logits; the CPU
                          also holds prefill attention scores and the dequant scratch)
    budget: GPU = free VRAM − margin (capped by gpu_memory), or gpu_memory alone when
            there is no GPU (planning only); RAM = available − margin
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from loaders.config import ModelConfig
from modelfiles.parameters import default
from quant.errors import InvalidParameterError, PlanError
from runtime.kv.kv_pool import kv_bytes_per_token
from runtime.kv.recurrent_state import state_bytes_per_layer
from runtime.placement.devices import Calibration, Devices, format_size
from runtime.placement.model_sizes import (
    ModelSizes,
    activation_bytes,
    kv_bytes_per_token_layer,
    kv_slots,
    logits_bytes,
    scores_bytes,
)
from runtime.placement.plan_cost import (
    CPU,
    GPU,
    Estimate,
    Placement,
    decode_estimate,
    forward_ops,
    prompt_estimate,
)

GPU_MARGIN_MIN = 256 << 20  # VRAM kept free: the larger of this and 5% of the card
GPU_MARGIN_FRACTION = 0.05
RAM_MARGIN = 512 << 20
CPU_SCRATCH = 16 << 20  # kernels/linear.py's dequantization scratch (CHUNK_BYTES)
# GGML types the Triton kernels read directly (kernels/triton/ggml_blocks.py GEOMETRY);
# a GPU tensor of another quantized type is dequantized whole, in a float32 buffer
GPU_KERNEL_TYPES = frozenset({2, 3, 6, 8, 12, 14, 39})  # 39: MXFP4 experts (triton/moe.py)
FLOAT_TYPES = frozenset({0, 1, 30})  # F32, F16, BF16: used in place


@dataclass(frozen=True)
class PlanRequest:
    num_ctx: int = default("num_ctx")
    num_parallel: int = 1  # one sequence (what `tandem run` holds); RunOptions gives its own
    num_gpu: int = default("num_gpu")  # -1 auto; 0 CPU only; N layers on the GPU
    gpu_memory: int | None = None  # a cap on VRAM use, bytes
    pins: tuple[str, ...] = ()  # tensor-name patterns kept on the CPU
    gpu_pins: tuple[str, ...] = ()  # tensor-name patterns put on the GPU in every candidate
    kv_type: str = default("kv_cache_type")
    num_batch: int = default("num_batch")  # prompt tokens per forward pass
    ctx_fill: int | None = None  # context the decode prediction assumes (default num_ctx/2)
    num_cpu_moe: int = -1  # -1 auto; N: the routed experts of the first N layers on the CPU

    def validate(self) -> None:
        for name in ("num_ctx", "num_parallel", "num_batch"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_gpu < -1:
            raise InvalidParameterError(
                f"num_gpu must be -1 (auto), 0 (CPU only) or a number of layers, got {self.num_gpu}"
            )
        if self.num_cpu_moe < -1:
            raise InvalidParameterError(
                f"num_cpu_moe must be -1 (auto) or a number of layers, got {self.num_cpu_moe}"
            )
        if self.gpu_memory is not None and self.gpu_memory <= 0:
            raise InvalidParameterError("gpu_memory must be a positive size such as 6GB")

    @property
    def fill(self) -> int:
        return max(1, min(self.ctx_fill or self.num_ctx // 2, self.num_ctx))


@dataclass(frozen=True)
class Budgets:
    gpu: int  # bytes the plan may use on the GPU (0: none)
    ram: int
    gpu_note: str  # how the figure was reached
    ram_note: str


@dataclass(frozen=True)
class Memory:
    weights: int = 0
    kv: int = 0
    buffers: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.buffers


@dataclass(frozen=True)
class Candidate:
    n_gpu: int  # the last n_gpu layers on the GPU
    head_gpu: bool
    kv_gpu: bool  # the GPU layers' KV in VRAM
    cpu_experts: tuple[int, int] = (0, 0)  # routed experts of layers [a, b) kept on the CPU

    @property
    def moe_split(self) -> bool:
        return self.cpu_experts[1] > self.cpu_experts[0]


@dataclass
class Plan:
    request: PlanRequest
    budgets: Budgets
    calibration: Calibration
    sizes: ModelSizes
    candidate: Candidate
    placement: Placement
    memory: dict  # GPU | CPU → Memory
    decode: Estimate
    prompt: Estimate
    sweep: list = field(default_factory=list)  # per n_gpu: the best candidate's figures

    @property
    def fits(self) -> bool:
        return all(
            self.memory[d].total <= b for d, b in ((GPU, self.budgets.gpu), (CPU, self.budgets.ram))
        )


def budgets(devices: Devices, request: PlanRequest) -> Budgets:
    ram = max(0, devices.ram_available - RAM_MARGIN)
    ram_note = f"available {format_size(devices.ram_available)} − margin {format_size(RAM_MARGIN)}"
    cap = request.gpu_memory
    if not devices.gpus:
        if cap is None:
            return Budgets(0, ram, "no GPU found", ram_note)
        return Budgets(
            cap, ram, f"gpu_memory {format_size(cap)}, no GPU here: planning only", ram_note
        )
    gpu = devices.gpus[0]
    margin = max(GPU_MARGIN_MIN, int(GPU_MARGIN_FRACTION * gpu.total_bytes))
    usable = max(0, gpu.free_bytes - margin)
    note = f"{gpu.name}: free {format_size(gpu.free_bytes)} − margin {format_size(margin)}"
    if cap is not None and cap < usable:
        usable, note = cap, f"{note}, capped by gpu_memory {format_size(cap)}"
    return Budgets(usable, ram, note, ram_note)


def compile_pins(patterns: tuple[str, ...], sizes: ModelSizes) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise InvalidParameterError(
                f"pin {pattern!r} is not a valid regular expression: {err}"
            ) from None
        if not any(rx.search(t.name) for t in sizes.tensors):
            raise InvalidParameterError(
                f"pin {pattern!r} matches no tensor of this model "
                "(names look like blk.3.ffn_up.weight)"
            )
        compiled.append(rx)
    return compiled


def place(
    sizes: ModelSizes,
    cand: Candidate,
    pins: list[re.Pattern],
    gpu_pins: list[re.Pattern] | None = None,
) -> Placement:
    """`pins` keep matching tensors on the CPU, `gpu_pins` put them on the GPU (a CPU pin
    wins where both match); a GPU-pinned head tensor takes the head to the GPU."""
    n_layer = sizes.config.n_layer
    first_gpu = n_layer - cand.n_gpu
    pinned = {t.name for t in sizes.tensors if any(rx.search(t.name) for rx in pins)}
    lo, hi = cand.cpu_experts
    pinned |= {
        t.name
        for t in sizes.tensors
        if t.group == "experts" and t.layer is not None and lo <= t.layer < hi
    }
    to_gpu = {
        t.name for t in sizes.tensors if any(rx.search(t.name) for rx in gpu_pins or ())
    } - pinned
    head_names = {t.name for t in sizes.head_tensors()}
    head = GPU if (cand.head_gpu or to_gpu & head_names) and not (pinned & head_names) else CPU
    tensors = {}
    for t in sizes.tensors:
        on_gpu = t.layer is not None and t.layer >= first_gpu
        tensors[t.name] = GPU if (on_gpu and t.name not in pinned) or t.name in to_gpu else CPU
    if not sizes.config.tied_head:
        tensors.update(dict.fromkeys(head_names, head))
    tensors[sizes.embd.name] = CPU  # the lookup runs on the CPU (a tied head's copy: `head`)
    kv = tuple(GPU if i >= first_gpu and cand.kv_gpu else CPU for i in range(n_layer))
    return Placement(tensors, head, kv)


def _buffers(sizes: ModelSizes, where: Placement, request: PlanRequest) -> dict:
    c, chunk = sizes.config, min(request.num_batch, request.num_ctx * request.num_parallel)
    common = activation_bytes(c, chunk) + logits_bytes(c, request.num_parallel)
    cpu = common + scores_bytes(c, chunk, request.num_ctx) + CPU_SCRATCH
    on_gpu = [t for t in sizes.tensors if where.tensors[t.name] == GPU]
    if where.head == GPU:
        on_gpu += sizes.head_tensors()
    if not on_gpu and GPU not in where.kv:
        return {GPU: 0, CPU: cpu}
    dequant = max(
        (4 * t.n_elements for t in on_gpu if t.ggml_type not in GPU_KERNEL_TYPES | FLOAT_TYPES),
        default=0,
    )
    return {GPU: common + dequant, CPU: cpu}


def memory(sizes: ModelSizes, where: Placement, request: PlanRequest) -> dict:
    weights = {GPU: 0, CPU: 0}
    for t in sizes.tensors:
        weights[where.tensors[t.name]] += t.nbytes
    if sizes.config.tied_head and where.head == GPU:
        weights[GPU] += sizes.embd.nbytes  # the head's own copy; the lookup keeps the mmap
    per_layer = zip(kv_per_layer(sizes.config, request), where.kv, strict=True)
    kv = {GPU: 0, CPU: 0}
    for nbytes, device in per_layer:
        kv[device] += nbytes
    buffers = _buffers(sizes, where, request)
    return {d: Memory(weights[d], kv[d], buffers[d]) for d in (GPU, CPU)}


def kv_per_layer(c: ModelConfig, request: PlanRequest) -> list[int]:
    """Bytes each layer holds for the request's sequences: an attention layer its KV pages,
    a recurrent one (qwen35's delta nets) a fixed state per sequence, whatever the context."""
    kv_bytes_per_token_layer(c, request.kv_type)  # a bad KV type fails here
    slots = kv_slots(request.num_ctx, request.num_parallel)
    n_attention = max(1, c.n_layer - sum(c.recurrent_layers))
    attention = slots * kv_bytes_per_token(c, request.kv_type) // n_attention
    state = request.num_parallel * state_bytes_per_layer(c)
    return [state if r else attention for r in (c.recurrent_layers or (False,) * c.n_layer)]


def evaluate(
    sizes: ModelSizes,
    cand: Candidate,
    pins: list[re.Pattern],
    budget: Budgets,
    cal: Calibration,
    request: PlanRequest,
    gpu_pins: list[re.Pattern] | None = None,
) -> Plan:
    where = place(sizes, cand, pins, gpu_pins)
    chunk = min(request.num_batch, request.num_ctx)
    seen, per_token = (
        attended(sizes, request),
        kv_bytes_per_token_layer(sizes.config, request.kv_type),
    )
    ops = forward_ops(
        sizes, where, [n * per_token for n in seen], chunk, [n + chunk / 2 for n in seen]
    )  # a prompt token: the fill + half a chunk
    return Plan(
        request,
        budget,
        cal,
        sizes,
        cand,
        where,
        memory(sizes, where, request),
        decode_estimate(sizes, ops, cal, request.fill),
        prompt_estimate(sizes, ops, cal, chunk),
    )


def attended(sizes: ModelSizes, request: PlanRequest) -> list[int]:
    """Per layer, the positions a token decoded at the request's context fill attends to: a
    sliding-window layer at most its window."""
    c = sizes.config
    return [
        min(request.fill, c.sliding_window) if c.sliding_window and swa else request.fill
        for swa in c.swa_layers
    ]


def candidates(
    n_layer: int, request: PlanRequest, has_gpu: bool, moe: bool = False
) -> list[Candidate]:
    if not has_gpu or request.num_gpu == 0:
        return [Candidate(0, False, False)]
    if moe and request.num_cpu_moe >= 0:  # llama.cpp's --n-cpu-moe N: the first N layers'
        n = min(request.num_cpu_moe, n_layer)
        return [Candidate(n_layer, head, True, (0, n)) for head in (False, True)]
    counts = range(n_layer + 1) if request.num_gpu < 0 else [min(request.num_gpu, n_layer)]
    layer_splits = [
        Candidate(n, head, kv)
        for n in counts
        for head in (False, True)
        for kv in ((True, False) if n else (False,))
    ]
    if not moe or request.num_gpu >= 0:
        return layer_splits
    # the MoE split: all layers on the GPU but the routed experts of layers i … n_layer−1
    return layer_splits + [
        Candidate(n_layer, head, True, (i, n_layer))
        for i in range(n_layer)
        for head in (False, True)
    ]


def plan(sizes: ModelSizes, devices: Devices, request: PlanRequest) -> Plan:
    """The fastest predicted placement that fits; PlanError when none does."""
    request.validate()
    kv_bytes_per_token_layer(sizes.config, request.kv_type)  # a bad KV type fails first
    pins = compile_pins(request.pins, sizes)
    gpu_pins = compile_pins(request.gpu_pins, sizes)
    for rx in gpu_pins:
        if not sizes.config.tied_head and all(
            t.name == sizes.embd.name for t in sizes.tensors if rx.search(t.name)
        ):
            raise InvalidParameterError(
                f"pin {rx.pattern}=gpu matches only {sizes.embd.name}, whose lookup runs on "
                "the CPU; pin layer or head tensors to the GPU"
            )
    budget = budgets(devices, request)
    if request.num_gpu > 0 and budget.gpu == 0:
        raise PlanError(
            f"num_gpu={request.num_gpu} asks for GPU layers but {budget.gpu_note}: "
            "give gpu_memory (e.g. --gpu-memory 6GB) to plan for a GPU, or use "
            "num_gpu 0"
        )
    if gpu_pins and budget.gpu == 0:
        raise PlanError(
            f"pin {request.gpu_pins[0]}=gpu asks for the GPU but {budget.gpu_note}: "
            "give gpu_memory (e.g. --gpu-memory 6GB) to plan for a GPU, or pin to cpu"
        )
    moe = sizes.config.n_expert > 0
    options = candidates(sizes.config.n_layer, request, budget.gpu > 0, moe)
    plans = [
        evaluate(sizes, c, pins, budget, devices.calibration, request, gpu_pins) for c in options
    ]
    fitting = [p for p in plans if p.fits]
    if not fitting:
        auto = replace(request, num_gpu=-1)  # what would fit, for the message
        others = [
            evaluate(sizes, c, pins, budget, devices.calibration, auto, gpu_pins)
            for c in candidates(sizes.config.n_layer, auto, budget.gpu > 0, moe)
        ]
        raise PlanError(
            refusal(
                plans,
                max((q.candidate.n_gpu for q in others if q.fits), default=None),
                request,
                budget,
            )
        )
    best = max(fitting, key=lambda p: (p.decode.tokens_per_s, -p.memory[GPU].total))
    best.sweep = sweep(plans)
    return best


def sweep(plans: list[Plan]) -> list[dict]:
    """Per number of GPU layers (and, for a MoE split, per first layer whose experts stay on
    the CPU), the fastest fitting candidate (the fastest of all when none of it fits)."""
    rows = {}
    for p in sorted(plans, key=lambda p: (p.fits, p.decode.tokens_per_s)):
        c = p.candidate
        rows[(c.n_gpu, c.cpu_experts[0] if c.moe_split else -1)] = p
    return [
        {
            "num_gpu": n,
            "cpu_experts_from": None if first < 0 else first,
            "fits": p.fits,
            "head_gpu": p.placement.head == GPU,
            "kv_gpu": p.candidate.kv_gpu,
            "gpu_bytes": p.memory[GPU].total,
            "ram_bytes": p.memory[CPU].total,
            "decode_tokens_per_s": p.decode.tokens_per_s,
            "prompt_tokens_per_s": p.prompt.tokens_per_s,
        }
        for (n, first), p in sorted(rows.items())
    ]


def _describe(m: Memory) -> str:
    return (
        f"{format_size(m.total)} (weights {format_size(m.weights)}, KV {format_size(m.kv)}, "
        f"buffers {format_size(m.buffers)})"
    )


def refusal(plans: list[Plan], most: int | None, request: PlanRequest, budget: Budgets) -> str:
    """Why nothing fits, with the numbers of the closest candidate and what to lower; `most`:
    the most GPU layers any plan fits (None: none fits at all)."""

    def over(p: Plan) -> int:
        return max(0, p.memory[GPU].total - budget.gpu) + max(0, p.memory[CPU].total - budget.ram)

    p = min(plans, key=over)
    kv_note = (
        f"the KV for num_ctx {request.num_ctx} × num_parallel {request.num_parallel} "
        f"({request.kv_type}) is {format_size(p.memory[GPU].kv + p.memory[CPU].kv)}"
    )
    if p.memory[CPU].total > budget.ram:
        return (
            f"the model does not fit: even the best split needs {_describe(p.memory[CPU])} "
            f"of RAM but {format_size(budget.ram)} is usable ({budget.ram_note}); "
            f"{kv_note}: lower num_ctx or num_parallel, use kv type q8_0, or put more "
            "on the GPU (num_gpu, gpu_memory)"
        )
    lower = f"lower num_gpu to at most {most}" if most else "use num_gpu 0"
    return (
        f"num_gpu={request.num_gpu} needs at least {_describe(p.memory[GPU])} of GPU "
        f"memory but the budget is {format_size(budget.gpu)} ({budget.gpu_note}); "
        f"{kv_note}: {lower}, or lower num_ctx or num_parallel"
    )
