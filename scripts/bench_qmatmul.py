"""Benchmark the native quantized matmul in its two layouts, GGML rows read in place
(kernels/native/qmatmul.cpp) and 16-row panels (kernels/native/interleaved.cpp, where the
build has them), against the torch dequantize-then-matmul path (kernels/linear.PackedLinear
without the kernel) on real model shapes.

M=1 (decode): GB/s of packed weights read per call. M=64 (prefill): tokens/s, i.e. 64 over
the time of one call. Weights are random blocks with finite fp16 scales (speed does not
depend on the values). Calls cycle through copies of the weight totalling ≥ --working-set MB
(default 768), so each reads its weight from DRAM as decoding a real model does (the VM
reports a 480 MB L3, shared with its host's other guests). Times are the best and the median
of the calls, after a warm-up; on a shared, loaded machine compare columns of one run.

    python scripts/bench_qmatmul.py                     # all shapes and types
    python scripts/bench_qmatmul.py --types Q4_0 Q4_K --shapes 1.1b --no-torch
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import native_loader  # noqa: E402
from kernels.linear import PackedLinear, interleave  # noqa: E402
from quant.formats import block_format  # noqa: E402

# (label, in_features K, out_features N, types: None = all of --types)
SHAPES = [
    ("smollm2 576→1536", 576, 1536, None),
    ("smollm2 1536→576", 1536, 576, None),
    ("smollm2 head 576→49152", 576, 49152, ("Q8_0",)),  # the tied Q8_0 embedding
    ("1.1b 2048→5632", 2048, 5632, None),
    ("1.1b 5632→2048", 5632, 2048, None),
    ("7b 4096→11008", 4096, 11008, None),
]
TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"]
# byte offsets of the fp16 scales in one block (ggml-common.h)
HALF_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
}


def random_weight(name: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    fmt = block_format(T[name])
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n * (k // fmt.block_size), fmt.type_size), dtype=np.uint8)
    for at in HALF_FIELDS[name]:
        scale = rng.uniform(1e-3, 1e-2, blocks.shape[0]).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1))


def timings(
    fn, x: torch.Tensor, copies: list[torch.Tensor], budget_s: float, min_reps: int = 3
) -> tuple[float, float]:
    """(best, median) seconds of fn(x, w) over calls cycling w through `copies`."""
    fn(x, copies[0])  # warm-up (page faults, the first-call build)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 400):
        w = copies[len(times) % len(copies)]
        t0 = time.perf_counter()
        fn(x, w)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="substrings of shape labels to keep (smollm2, 1.1b, 7b, head)",
    )
    ap.add_argument("--prefill", type=int, default=64, help="tokens of the prefill case")
    ap.add_argument("--no-torch", action="store_true", help="skip the (slow) torch path")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--working-set", type=float, default=768, help="MB of weight copies cycled")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not native_loader.available():
        sys.exit("native kernel unavailable (see the warning above)")
    print(
        f"native build: {native_loader.load().ISA}, ready in {time.perf_counter() - t0:.1f} s;"
        f" threads {torch.get_num_threads()}"
    )
    mp = args.prefill
    print(
        f"GB/s: packed weight bytes / time per call at M=1; tok/s: {mp} / time per call at "
        f"M={mp}; best (median) over the calls"
    )
    head = (
        f"{'shape':23} {'type':5} {'MB':>6} | {'rows GB/s':>14} {'panels GB/s':>14} "
        f"{'torch GB/s':>12} | {'rows tok/s':>15} {'panels tok/s':>15} {'torch tok/s':>13}"
    )
    print(head)
    print("-" * len(head))
    for label, k, n, only in SHAPES:
        if args.shapes and not any(s in label for s in args.shapes):
            continue
        for name in args.types:
            fmt = block_format(T[name])
            if (only and name not in only) or k % fmt.block_size:
                continue
            w = random_weight(name, n, k)
            copies = [w] + [w.clone() for _ in range(int(args.working_set * 1e6 // w.numel()))]
            qt = int(T[name])
            x1, xp = torch.randn(1, k), torch.randn(mp, k)
            mb = w.numel() / 1e6
            has_panels = interleave(w[:16], qt) is not None
            panel_copies = [interleave(c, qt) for c in copies] if has_panels else []

            def native(x, w, qt=qt):
                return native_loader.qmatmul(x, w, qt)

            def panels(x, p, qt=qt, n=n, module=native_loader.load()):
                return module.imatmul_many(x, [p], [n], qt)[0]

            def torch_path(x, w, qt=qt, k=k):
                return PackedLinear(w, qt, k, native=False)(x)

            cols = []
            for fn, those, skip in (
                (native, copies, False),
                (panels, panel_copies, not has_panels),
                (torch_path, copies, args.no_torch),
            ):
                if skip:
                    cols.append((float("nan"),) * 4)
                    continue
                b1, m1 = timings(fn, x1, those, args.budget)
                bp, m_p = timings(fn, xp, those, args.budget, min_reps=2)
                cols.append((mb / 1e3 / b1, mb / 1e3 / m1, mp / bp, mp / m_p))
            del panel_copies
            (ng, ngm, nt, ntm), (pg, pgm, pt, ptm), (tg, tgm, tt, ttm) = cols
            print(
                f"{label:23} {name:5} {mb:6.2f} | {ng:6.2f} ({ngm:5.2f}) {pg:6.2f} ({pgm:5.2f}) "
                f"{tg:5.2f} ({tgm:4.2f}) | {nt:7.0f} ({ntm:5.0f}) {pt:7.0f} ({ptm:5.0f}) "
                f"{tt:6.0f} ({ttm:5.0f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
