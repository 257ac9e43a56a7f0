"""GB/s of tandem's Triton kernels on a CUDA GPU, against the card's measured bandwidth.

    python scripts/bench_gpu.py [--json] [--out FILE.json] [--shapes 4096x4096,11008x4096,...]

For each GGML type with a kernel and each (N, K) weight shape: the decode GEMV (x: 1 row)
as packed weight bytes read per second, and that as a share of the card's read bandwidth
(a float32 sum over 1 GiB, runtime/placement/devices.py); the prefill GEMM (512 rows) in TFLOP/s;
paged decode attention as KV bytes read per second. Needs CUDA (it cannot run under the
interpreter: the figures would mean nothing). Timings: triton.testing.do_bench (median).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
# llama-7B's projections, a 1B's, SmolLM2's FFN
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (2048, 2048), (1536, 576))


def random_weight(qtype: int, n: int, k: int) -> torch.Tensor:
    """Random packed rows on the GPU; the speed does not depend on the values (the float16
    scale fields may be any bits here: the output is not checked)."""
    from kernels.triton.ggml_blocks import GEOMETRY

    qk, size = GEOMETRY[qtype]
    return torch.randint(0, 256, (n, k // qk * size), dtype=torch.uint8, device="cuda")


def bench_matmul(qtype: int, n: int, k: int, vram_bw: float) -> dict:
    from triton.testing import do_bench

    from kernels.triton import qmatmul

    w = random_weight(qtype, n, k)
    x1 = torch.randn(1, k, device="cuda")
    x512 = torch.randn(512, k, device="cuda")
    gemv_ms = do_bench(lambda: qmatmul(x1, w, qtype))
    gemm_ms = do_bench(lambda: qmatmul(x512, w, qtype))
    gbs = w.numel() / (gemv_ms * 1e-3) / 1e9
    return {
        "n": n,
        "k": k,
        "gemv_us": gemv_ms * 1e3,
        "gemv_GBps": gbs,
        "gemv_share_of_bandwidth": gbs * 1e9 / vram_bw,
        "gemm_512_TFLOPs": 2 * 512 * n * k / (gemm_ms * 1e-3) / 1e12,
    }


def bench_attention(vram_bw: float, batch: int = 16, ctx: int = 2048) -> dict:
    from triton.testing import do_bench

    from kernels.triton import PAGE, paged_attention_decode

    n_head, n_kv, d = 32, 8, 128
    blocks = batch * ctx // PAGE
    k_pool = torch.randn(blocks, PAGE, n_kv, d, device="cuda", dtype=torch.float16)
    v_pool = torch.randn_like(k_pool)
    tables = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, n_head, d, device="cuda")
    ms = do_bench(lambda: paged_attention_decode(q, k_pool, v_pool, tables, lens, d**-0.5))
    gbs = 2 * k_pool.numel() * 2 / (ms * 1e-3) / 1e9
    return {
        "batch": batch,
        "ctx": ctx,
        "us": ms * 1e3,
        "kv_GBps": gbs,
        "share_of_bandwidth": gbs * 1e9 / vram_bw,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--shapes", help="comma-separated NxK weight shapes")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from runtime.placement.devices import measure_gpu

    shapes = (
        [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    )
    card = measure_gpu(0)
    rows = [
        {"type": name, **bench_matmul(q, n, k, card["vram_bw"])}
        for name, q in TYPES.items()
        for n, k in shapes
    ]
    report = {
        "device": torch.cuda.get_device_name(0),
        "measured": card,
        "matmul": rows,
        "attention": bench_attention(card["vram_bw"]),
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(
        f"{report['device']}: read bandwidth {card['vram_bw'] / 1e9:.0f} GB/s, "
        f"fp16 matmul {card['gpu_flops'] / 1e12:.0f} TFLOP/s, host→device "
        f"{card['h2d_bw'] / 1e9:.1f} GB/s, hand-off {card['link_latency_s'] * 1e6:.0f} µs"
    )
    print(f"{'type':6}{'N x K':>14}{'GEMV µs':>10}{'GB/s':>8}{'share':>8}{'GEMM TFLOP/s':>14}")
    for r in rows:
        print(
            f"{r['type']:6}{r['n']:>8}x{r['k']:<5}{r['gemv_us']:>10.1f}{r['gemv_GBps']:>8.0f}"
            f"{r['gemv_share_of_bandwidth']:>8.0%}{r['gemm_512_TFLOPs']:>14.1f}"
        )
    a = report["attention"]
    print(
        f"paged attention, {a['batch']} sequences × {a['ctx']} tokens: {a['us']:.0f} µs, "
        f"{a['kv_GBps']:.0f} GB/s of KV ({a['share_of_bandwidth']:.0%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
