"""Devices: what this machine offers a model — GPUs with their free memory, RAM, CPU cores —
and the speeds the planner predicts from, measured once and cached.

`Calibration` holds memory bandwidths (RAM, VRAM, host↔device), matmul rates and the
per-layer and per-transfer fixed costs. `calibrate()` measures what this machine has (RAM and
CPU always; VRAM, the link and GPU matmuls through torch.cuda when a GPU is present) and
caches the result in TANDEM_HOME/calibration.json, keyed by the hardware, so it runs once.
Figures it cannot measure (a GPU on a machine without one, for `tandem plan --gpu-memory`)
are stated assumptions, marked as such in `sources`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import psutil
import torch

from kernels.thread_policy import default_threads
from loaders.pull import tandem_home
from quant.errors import InvalidParameterError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "6GB" (10^9), "6GiB" (2^30), "512MiB", "1.5 GB" or "1024"."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise InvalidParameterError(
            f"cannot read the size {text!r}: write a number and a unit such as 6GB, 6GiB, 512MiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    """1536 MiB → "1.50 GiB": binary units, three significant-ish figures."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


@dataclass(frozen=True)
class Calibration:
    """Speeds of this machine (bytes/s, FLOP/s, seconds). `sources[name]` says "measured"
    or "assumed" for each figure. The defaults are assumptions; the measurements behind them
    are in docs/planner.md."""

    ram_bw: float = 20e9  # RAM read bandwidth
    cpu_flops: float = 50e9  # float32 matmul rate of the CPU
    vram_bw: float = 300e9  # GPU memory read bandwidth (a mid-range consumer card)
    gpu_flops: float = 20e12  # float16 tensor-core matmul rate
    h2d_bw: float = 12e9  # host → device copy (PCIe 3/4 x16, pinned)
    link_latency_s: float = 20e-6  # one hand-off across the link, synchronised
    cpu_layer_s: float = 100e-6  # fixed cost of one layer on the CPU (op dispatch)
    gpu_layer_s: float = 50e-6  # fixed cost of one layer on the GPU (~10 kernel launches)
    cpu_efficiency: float = 0.85  # fraction of ram_bw a decode matmul reaches (panel kernels)
    gpu_efficiency: float = 0.7  # fraction of vram_bw (the goal the GEMV kernels are set)
    cpu_kv_efficiency: float = 0.38  # fraction of ram_bw at which CPU decode attention goes
    # through the KV: it converts and multiplies, not only reads
    # Prompt processing on the CPU: the native kernels' matmul rate per GGML type (str of its
    # number → FLOP/s; types absent: cpu_flops), and the rate of the elementwise ops (norms,
    # RoPE, activation, residual adds) in bytes of activations a token touches per layer, as a
    # share of ram_bw
    cpu_type_flops: dict = field(default_factory=dict)
    cpu_act_share: float = 0.2
    cpu_attn_flops: float = 80e9  # prefill attention (torch's SDPA over gathered pages)
    sources: dict = field(default_factory=dict)

    def source(self, name: str) -> str:
        return self.sources.get(name, "assumed")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Devices:
    gpus: tuple[Gpu, ...]
    ram_total: int
    ram_available: int
    cpu_cores: int
    calibration: Calibration


def detect_gpus() -> tuple[Gpu, ...]:
    """CUDA devices with their free memory now (torch.cuda.mem_get_info); () without CUDA."""
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(Gpu(i, torch.cuda.get_device_name(i), total, free))
    return tuple(gpus)


def detect(calibrated: bool = True, recalibrate: bool = False) -> Devices:
    """This machine's devices; with `calibrated`, speeds from the cache (measured on first use,
    or again with `recalibrate`); without, the stated assumptions of Calibration()."""
    mem = psutil.virtual_memory()
    gpus = detect_gpus()
    cal = calibrate(gpus, force=recalibrate) if calibrated else Calibration()
    return Devices(gpus, mem.total, mem.available, psutil.cpu_count(logical=False) or 1, cal)


# ---- measurement -----------------------------------------------------------------------


def _best_seconds(fn, repeats: int, sync=lambda: None) -> float:
    """The fastest of `repeats` timed calls of fn (after one warm-up call)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_ram_bw(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """RAM read bandwidth: a float32 sum over a buffer far larger than the caches."""
    x = torch.ones(nbytes // 4)  # written once, so every page is resident before timing
    return nbytes / _best_seconds(x.sum, repeats)


def measure_cpu_flops(n: int = 1024, repeats: int = 3) -> float:
    a = torch.randn(n, n)
    return 2 * n**3 / _best_seconds(lambda: a @ a, repeats)


def measure_cpu_type_flops(rows: int = 64, n: int = 2048) -> dict[str, float]:
    """The native kernels' matmul rate (FLOP/s) per GGML type they run in panels, at `rows`
    rows of activations on an n×n weight of random blocks (the speed does not depend on the
    values); {} without a native build."""
    from kernels.linear import PackedLinear, interleave
    from kernels.native_loader import enabled, load
    from quant.formats import block_format

    module = load() if enabled() else None
    if module is None:
        return {}
    rates, x = {}, torch.randn(rows, n)
    for qtype in (2, 3, 6, 8, 12, 14):  # Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K
        if not module.interleaved_supports(qtype):
            continue
        weight = torch.randint(0, 256, (n, block_format(qtype).row_bytes(n)), dtype=torch.uint8)
        linear = PackedLinear(weight, qtype, n, None, panels=interleave(weight, qtype))
        with torch.inference_mode():
            rates[str(qtype)] = 2 * rows * n * n / _best_seconds(partial(linear, x), 3)
    return rates


def measure_cpu_attn_flops(
    rows: int = 64, context: int = 1024, heads: int = 8, kv_heads: int = 2, dim: int = 64
) -> float:
    """Prefill attention's rate (FLOP/s) as a prompt chunk at that depth runs it: `rows`
    causal queries over `context` keys whose f16 pages are gathered and widened first
    (runtime/kv/kv_pool.py), then torch's SDPA (kernels/attention.py)."""
    from kernels.attention import attention

    q = torch.randn(rows, heads, dim)
    pages = torch.randn(2, context, kv_heads, dim).half()
    slots = torch.randperm(context)

    def chunk():
        keys, values = pages[0][slots].float(), pages[1][slots].float()
        return attention(q, keys, values, context - rows, 0, dim**-0.5)

    return 4 * heads * rows * context * dim / _best_seconds(chunk, 5)


def measure_gpu(index: int = 0) -> dict[str, float]:
    """VRAM read bandwidth, float16 matmul rate, pinned host→device bandwidth and latency."""
    dev, sync = torch.device("cuda", index), torch.cuda.synchronize
    x = torch.ones(256 << 20, device=dev)  # 1 GiB of float32
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    host = torch.ones(64 << 20).pin_memory()  # 256 MiB
    tiny = torch.ones(1024).pin_memory()
    return {
        "vram_bw": x.numel() * 4 / _best_seconds(x.sum, 10, sync),
        "gpu_flops": 2 * 4096**3 / _best_seconds(lambda: a @ a, 10, sync),
        "h2d_bw": host.numel()
        * 4
        / _best_seconds(lambda: host.to(dev, non_blocking=True), 5, sync),
        "link_latency_s": _best_seconds(lambda: tiny.to(dev).cpu(), 20, sync) / 2,
    }


def _signature(gpus: tuple[Gpu, ...]) -> str:
    """What the cached figures depend on: the CPU, RAM size, GPUs, torch and thread count."""
    ram_gib = round(psutil.virtual_memory().total / 2**30)
    names = ",".join(g.name for g in gpus) or "no-gpu"
    return (
        f"{platform.machine()}|{platform.processor()}|{os.cpu_count()}|{ram_gib}GiB|"
        f"{names}|torch {torch.__version__}|{default_threads()} threads"
    )


def _cache_path():
    return tandem_home() / "calibration.json"


def _from_cache(saved: dict) -> Calibration:
    """The measured figures of a cached calibration over today's assumptions: a cache never
    freezes an assumed constant (an efficiency, a per-layer cost) that the code has revised."""
    sources = {k: v for k, v in saved["sources"].items() if v == "measured"}
    values = {k: (dict(saved[k]) if k == "cpu_type_flops" else float(saved[k])) for k in sources}
    return replace(Calibration(), **values, sources=sources)


def calibrate(gpus: tuple[Gpu, ...] | None = None, force: bool = False) -> Calibration:
    """The cached Calibration for this hardware, measuring it first if there is none."""
    gpus = detect_gpus() if gpus is None else gpus
    sig, path = _signature(gpus), _cache_path()
    if not force and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("signature") == sig:
                return _from_cache(cached["calibration"])
        except (ValueError, TypeError, KeyError, AttributeError):
            pass  # unreadable or from an older layout: measure again
    measured: dict[str, float | dict[str, float]] = {
        "ram_bw": measure_ram_bw(),
        "cpu_flops": measure_cpu_flops(),
        "cpu_attn_flops": measure_cpu_attn_flops(),
    }
    if rates := measure_cpu_type_flops():
        measured["cpu_type_flops"] = rates
    if gpus:
        measured.update(measure_gpu(gpus[0].index))
    cal = replace(Calibration(), **measured, sources=dict.fromkeys(measured, "measured"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"signature": sig, "calibration": asdict(cal)}, indent=1))
    tmp.replace(path)
    return cal
