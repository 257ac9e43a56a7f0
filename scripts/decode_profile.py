"""Where a decode step's time goes: the matmul kernels against everything else.

    python scripts/decode_profile.py smollm2 gemma3 [--tokens 64] [--threads 2] [--json]

Runs `tandem bench`'s generation test (one-token forwards from position 0, greedy) twice per
model: once plain, for the step time, and once with the time spent inside the packed matmuls
(PackedLinear calls and fused `matmuls` groups: activation quantization, the native kernel,
its thread pool, the output allocation) summed with perf_counter around each call. The rest
of the step — norms, RoPE, attention and the KV cache, activations, residual adds, the
Python between them — is reported as the share outside the matmul kernels. The timers add
about a microsecond per matmul; the share is computed within the instrumented run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime.models  # noqa: E402
from kernels import linear  # noqa: E402
from runtime.cli.bench import Bench, BenchSpec, weight_bytes_per_token  # noqa: E402
from runtime.loaded_model import LoadedModel  # noqa: E402


class MatmulTimer:
    """Sums the wall time of the outermost PackedLinear / matmuls calls while installed."""

    def __init__(self) -> None:
        self.seconds, self.calls, self._depth = 0.0, 0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
                self._depth -= 1

        return timed

    def install(self) -> list:
        saved = [
            (linear.PackedLinear, "__call__", linear.PackedLinear.__call__),
        ] + [(mod, "matmuls", mod.matmuls) for mod in users_of_matmuls()]
        for owner, name, fn in saved:
            setattr(owner, name, self.wrap(fn))
        return saved


def users_of_matmuls() -> list:
    """The model modules that call kernels.linear.matmuls by their own imported name."""
    mods = (
        importlib.import_module(f"runtime.models.{m.name}")
        for m in pkgutil.iter_modules(runtime.models.__path__)
    )
    return [mod for mod in mods if getattr(mod, "matmuls", None) is linear.matmuls]


def profile(name: str, tokens: int) -> dict:
    lm = LoadedModel.load(name)
    bench = Bench(lm, BenchSpec(name, 0, tokens, None, 1))
    bench.time_generation(2)  # warm-up
    plain = min(bench.time_generation(tokens) for _ in range(2))
    timer = MatmulTimer()
    saved = timer.install()
    try:
        timed = bench.time_generation(tokens)
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
    matmul = timer.seconds
    return {
        "model": name,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "tok_s": tokens / plain,
        "step_ms": 1e3 * plain / tokens,
        "instrumented_step_ms": 1e3 * timed / tokens,
        "matmul_ms": 1e3 * matmul / tokens,
        "matmul_calls_per_step": timer.calls / tokens,
        "outside_matmuls_ms": 1e3 * (timed - matmul) / tokens,
        "outside_share": (timed - matmul) / timed,
        "matmul_gb_s": weight_bytes_per_token(lm) * tokens / matmul / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [profile(m, args.tokens) for m in args.models]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        print(
            f"{r['model']}: {r['tok_s']:.1f} tok/s, step {r['step_ms']:.2f} ms; instrumented "
            f"{r['instrumented_step_ms']:.2f} ms = matmuls {r['matmul_ms']:.2f} ms "
            f"({r['matmul_calls_per_step']:.0f} calls, {r['matmul_gb_s']:.1f} GB/s of "
            f"weights) + outside {r['outside_matmuls_ms']:.2f} ms "
            f"({100 * r['outside_share']:.0f}% of the step)"
        )


if __name__ == "__main__":
    main()
