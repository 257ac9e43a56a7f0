"""CPU paged decode attention alone (kernels/native/paged_attention.cpp): one call per
sequence batch over f16 KV pages scattered at random, hot (the same call again) and cold (after
a 64 MB read that evicts the KV from the caches), with a Q4_0 matmul of the same bytes read the
same way beside it as the RAM-speed yardstick. Rounds interleave the cases; figures are medians.

    python scripts/bench_attention.py
    python scripts/bench_attention.py --shape 16,4,256 --context 4096 --batch 1 -t 2

A shape is query heads, KV heads, head size (Qwen3.5-4B 16,4,256; Llama-3.2-1B 32,8,64;
SmolLM2-135M 9,3,64; gpt-oss 64,8,64).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.attention import paged_decode_attention  # noqa: E402
from kernels.linear import PackedLinear, interleave  # noqa: E402

PAGE = 16
SHAPES = ["16,4,256", "32,8,64", "9,3,64", "64,8,64"]


def attention_case(h: int, hkv: int, d: int, n: int, b: int):
    """The arguments of one call: B sequences of n positions over scattered pages."""
    g = torch.Generator().manual_seed(0)
    blocks = b * -(-n // PAGE)
    k = torch.randn(blocks * PAGE, hkv, d, generator=g).half()
    v = torch.randn(blocks * PAGE, hkv, d, generator=g).half()
    q = torch.randn(b, h, d, generator=g)
    tables = torch.randperm(blocks, generator=g).int().reshape(b, -1)
    return (q, k, v, tables, torch.full((b,), n), d**-0.5, 0)


def matmul_case(nbytes: int):
    """A Q4_0 PackedLinear of about nbytes and its one-token input."""
    k = 4096
    row = k // 32 * 18
    n = max(16, nbytes // row // 16 * 16)
    w = torch.randint(0, 256, (n, row), dtype=torch.uint8)
    w.view(-1, 18)[:, 1] = 0x10  # small finite fp16 scales
    lin = PackedLinear(w, T.Q4_0, k, panels=interleave(w, T.Q4_0))
    x = torch.randn(1, k)
    return lambda: lin(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--shape", action="append", help="H,Hkv,D (repeatable)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    evict = np.ones(64 << 20, dtype=np.uint8)  # read by numpy: one thread, no torch pool spin
    cases = {}
    for spec in args.shape or SHAPES:
        h, hkv, d = (int(x) for x in spec.split(","))
        call = attention_case(h, hkv, d, args.context, args.batch)
        nbytes = 2 * args.batch * args.context * hkv * d * 2
        cases[f"attention H{h} Hkv{hkv} D{d}"] = (lambda c=call: paged_decode_attention(*c), nbytes)
    first = next(iter(cases.values()))[1]
    cases["Q4_0 matmul, same bytes"] = (matmul_case(first), first)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, (fn, _) in cases.items():
            for mode in ("hot", "cold"):
                fn()
                for _ in range(6):
                    if mode == "cold":
                        evict.sum()
                    start = time.perf_counter()
                    fn()
                    times.setdefault((name, mode), []).append(time.perf_counter() - start)
    print(f"context {args.context}, batch {args.batch}, {args.threads} threads")
    for name, (_, nbytes) in cases.items():
        cells = []
        for mode in ("hot", "cold"):
            t = statistics.median(times[name, mode])
            cells.append(f"{mode} {1e3 * t:7.3f} ms {nbytes / t / 1e9:5.1f} GB/s")
        print(f"  {name:28s} {nbytes / 1e6:6.1f} MB  " + "   ".join(cells))


if __name__ == "__main__":
    main()
