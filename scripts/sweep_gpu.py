"""The num_gpu sweep: at each number of GPU layers, the planner's predicted prompt and decode
tokens/s beside the measured ones, the auto plan's pick, and how close it came to the best.

    python scripts/sweep_gpu.py MODEL [--points 0,8,16,all] [-p 256] [-n 64] [-d 0] [-r 3] [--json]
                                      [--json-out FILE.json]

MODEL: a pullable name (smollm2, gemma3), a stored model or a .gguf path. Each point N loads
the model placed by the planner with num_gpu = N (so the prediction and the measurement are
of the same placement: the same layers, head and KV on the GPU), measures it as
`tandem bench -p P -n N --num-gpu N` does (runtime/cli/bench.py: the serving engine's paged path,
CUDA graphs when every layer is on the GPU), and frees it before the next. The decode
prediction assumes the context the tg test averages (n_gen / 2 tokens). The auto point
(num_gpu -1) is the plan `tandem run` would use. The machine's speeds are calibrated afresh
at the start (runtime/placement/devices.py), so predictions and measurements share the machine's
state.

Reported per point: predicted and measured tg and pp tokens/s and the prediction's error
(predicted / measured − 1; goal within ±15%); for the all-GPU point the weights' GB/s and
their share of the card's measured read bandwidth (goal ≥ 70%); and the auto plan's measured
tg as a share of the best measured point (goal ≥ 95%). Without CUDA only point 0 (all on
the CPU) can run, which still checks the CPU side of the cost model.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loaders.config import ModelConfig  # noqa: E402
from quant.errors import PlanError  # noqa: E402
from runtime.cli.bench import Bench, BenchSpec, bench_context  # noqa: E402
from runtime.loaded_model import LoadedModel, _open_gguf, resolve  # noqa: E402
from runtime.placement.devices import detect  # noqa: E402
from runtime.placement.model_sizes import ModelSizes  # noqa: E402
from runtime.placement.planner import PlanRequest, plan  # noqa: E402


def default_points(n_layer: int, has_gpu: bool) -> list[int]:
    """0, about eight steps up to every layer, and auto (-1); only 0 without a GPU."""
    if not has_gpu:
        return [0]
    step = max(1, -(-n_layer // 8))
    return sorted({*range(0, n_layer, step), n_layer}) + [-1]


def parse_points(text: str | None, n_layer: int, has_gpu: bool) -> list[int]:
    if not text:
        return default_points(n_layer, has_gpu)
    points = [n_layer if p.strip() == "all" else int(p) for p in text.split(",")]
    return points if -1 in points or not has_gpu else [*points, -1]


def predict(sizes: ModelSizes, spec: BenchSpec, num_gpu: int):
    """The planner's plan at this num_gpu for the bench's context and fill."""
    request = PlanRequest(
        num_ctx=bench_context(spec),
        num_parallel=1,
        num_gpu=num_gpu,
        ctx_fill=spec.n_depth + max(1, spec.n_gen // 2),
    )
    return plan(sizes, detect(), request)


def measure(spec: BenchSpec) -> dict:
    from runtime.placement.auto_placement import auto_placement

    placement = auto_placement(num_ctx=bench_context(spec), num_gpu=spec.num_gpu)
    lm = LoadedModel.load(spec.model, placement)
    try:
        return Bench(lm, spec).run().to_dict()
    finally:
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def error(predicted: float | None, measured: float | None) -> float | None:
    return predicted / measured - 1 if predicted and measured else None


def sweep(model: str, points: list[int], spec: BenchSpec) -> dict:
    _, path = resolve(model)
    gguf = _open_gguf(path)  # held for the whole sweep: its CPU panels are made once
    config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors.keys())
    sizes = ModelSizes.from_tensors(config, gguf.tensors)
    devices = detect(recalibrate=True)  # this machine's speeds now, beside the measurements
    rows = []
    for n in points:
        try:
            p = predict(sizes, spec, n)
        except PlanError as err:
            rows.append({"num_gpu": n, "refused": str(err)})
            continue
        m = measure(BenchSpec(**{**spec.__dict__, "num_gpu": n}))
        rows.append(
            {
                "num_gpu": n,
                "gpu_layers": m["gpu_layers"],
                "placement": m["placement"],
                "head_gpu": p.placement.head == "gpu",
                "cuda_graphs": m["cuda_graphs"],
                "tg_predicted": p.decode.tokens_per_s,
                "tg_measured": m["tg_tok_s"],
                "tg_measured_std": m["tg_tok_s_std"],
                "tg_error": error(p.decode.tokens_per_s, m["tg_tok_s"]),
                "pp_predicted": p.prompt.tokens_per_s,
                "pp_measured": m["pp_tok_s"],
                "pp_error": error(p.prompt.tokens_per_s, m["pp_tok_s"]),
                "weights_gb_s": m["weights_gb_s"],
            }
        )
    return summarize(model, rows, devices, config.n_layer, spec)


def summarize(model: str, rows: list[dict], devices, n_layer: int, spec: BenchSpec) -> dict:
    cal = devices.calibration
    measured = [r for r in rows if r.get("tg_measured") and r["num_gpu"] != -1]
    best = max(measured, key=lambda r: r["tg_measured"], default=None)
    auto = next((r for r in rows if r["num_gpu"] == -1 and r.get("tg_measured")), None)
    full = next((r for r in measured if r["gpu_layers"] == n_layer), None)
    return {
        "model": model,
        "n_layer": n_layer,
        "n_prompt": spec.n_prompt,
        "n_gen": spec.n_gen,
        "n_depth": spec.n_depth,
        "gpus": [g.name for g in devices.gpus],
        "vram_bw": cal.vram_bw,
        "ram_bw": cal.ram_bw,
        "points": rows,
        "best_num_gpu": best["num_gpu"] if best else None,
        "auto_gpu_layers": auto["gpu_layers"] if auto else None,
        "auto_share_of_best": auto["tg_measured"] / best["tg_measured"] if auto and best else None,
        "full_gpu_share_of_vram_bw": (
            full["weights_gb_s"] * 1e9 / cal.vram_bw if full and devices.gpus else None
        ),
    }


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def format_report(r: dict) -> str:
    at = f" @ d{r['n_depth']}" if r["n_depth"] else ""
    lines = [
        f"{r['model']}: {r['n_layer']} layers; pp{r['n_prompt']} and tg{r['n_gen']}{at}; "
        f"GPUs {r['gpus'] or 'none'}; VRAM {r['vram_bw'] / 1e9:.0f} GB/s, RAM "
        f"{r['ram_bw'] / 1e9:.1f} GB/s (calibration)",
        "| num_gpu | placement | head | graphs | tg predicted | tg measured | tg error "
        "| pp predicted | pp measured | pp error | weights GB/s |",
        "|" + "---|" * 11,
    ]
    for p in r["points"]:
        name = "auto" if p["num_gpu"] == -1 else str(p["num_gpu"])
        if "refused" in p:
            lines.append(f"| {name} | refused: {p['refused']} |")
            continue
        lines.append(
            f"| {name} | {p['placement']} | {'gpu' if p['head_gpu'] else 'cpu'} | "
            f"{'yes' if p['cuda_graphs'] else 'no'} | {_f(p['tg_predicted'])} | "
            f"{_f(p['tg_measured'])} ± {_f(p['tg_measured_std'])} | "
            f"{_f(p['tg_error'], '{:+.0%}')} | {_f(p['pp_predicted'])} | {_f(p['pp_measured'])} "
            f"| {_f(p['pp_error'], '{:+.0%}')} | {_f(p['weights_gb_s'], '{:.2f}')} |"
        )
    if r["auto_share_of_best"] is not None:
        lines.append(
            f"auto plan: {r['auto_gpu_layers']} GPU layers, "
            f"{r['auto_share_of_best']:.0%} of the best point's tg "
            f"(num_gpu {r['best_num_gpu']})"
        )
    if r["full_gpu_share_of_vram_bw"] is not None:
        lines.append(
            f"all layers on the GPU: weights read at "
            f"{r['full_gpu_share_of_vram_bw']:.0%} of the card's measured bandwidth"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument(
        "--points",
        help="comma-separated num_gpu values ('all': every layer); "
        "the auto plan is always added on a GPU machine",
    )
    ap.add_argument("-p", "--n-prompt", type=int, default=256)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument(
        "-d",
        "--n-depth",
        type=int,
        default=0,
        help="tokens already in the cache when each test starts (bench's -d)",
    )
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--json-out", type=Path, help="also write the JSON report to this file")
    args = ap.parse_args(argv)
    spec = BenchSpec(
        args.model, args.n_prompt, args.n_gen, args.threads, args.repetitions, n_depth=args.n_depth
    )
    spec.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, path = resolve(args.model)
    gguf = _open_gguf(path)
    n_layer = ModelConfig.from_metadata(gguf.metadata, gguf.tensors.keys()).n_layer
    points = parse_points(args.points, n_layer, torch.cuda.is_available())
    report = sweep(args.model, points, spec)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
