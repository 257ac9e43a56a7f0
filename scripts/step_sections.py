"""Where a decode step's time goes, part by part: one model, N sequences decoding together
through the paged runner, with wall-clock timers around the model's parts.

    python scripts/step_sections.py q3moe-7l-q4_0.gguf --batch 1
    python scripts/step_sections.py q3moe-7l-q4_0.gguf --batch 16 --steps 16
    python scripts/step_sections.py qwen35-4b-q4_k.gguf --depth 4096

Parts timed (each the outermost call; a part inside another is counted in both): the token
embedding lookup, the layers, the head (`logits`), the RoPE tables, a MoE layer's whole
feed-forward and within it the router (`route`) and the fused routed feed-forward
(`routed_ffn`), the fused q/k/v (and gate/up) `matmuls` groups, single PackedLinear calls
(attention output, routers, head), the CPU paged decode attention and a delta-net layer (Qwen3.5)
with its recurrence. The timers add about a microsecond per call. Figures are per decode step,
after a prefill of --depth tokens per sequence (default 8, in 512-token chunks) and a warm-up step.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_profile import users_of_matmuls  # noqa: E402

import runtime.models.delta_net as delta_net  # noqa: E402
import runtime.models.moe as moe  # noqa: E402
from kernels import layer_ops, linear  # noqa: E402
from loaders.config import ModelConfig  # noqa: E402
from loaders.gguf_file import GGUFFile  # noqa: E402
from runtime.execution.model_runner import ModelRunner  # noqa: E402
from runtime.kv import attention_backends  # noqa: E402
from runtime.kv.forward_batch import ForwardBatch  # noqa: E402
from runtime.models import build_model  # noqa: E402

PAGE = 16
CHUNK = 512  # prefill tokens per forward pass


class Timers:
    """Sums wall time per label over the wrapped callables while installed."""

    def __init__(self) -> None:
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._saved: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        seconds = self.seconds

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start

        self._saved.append((owner, attr, fn))
        _set(owner, attr, timed)

    def remove(self) -> None:
        for owner, attr, fn in reversed(self._saved):
            _set(owner, attr, fn)
        self._saved.clear()


def _set(owner: object, attr: str, value: object) -> None:
    """setattr, also on a frozen dataclass instance (the CPU LayerOps)."""
    if isinstance(owner, type):
        setattr(owner, attr, value)
    else:
        object.__setattr__(owner, attr, value)


def install(model: object) -> Timers:
    timers = Timers()
    cls = type(model)
    for attr in ("embed_rows", "logits", "rope_tables", "run_layers"):
        if hasattr(cls, attr):
            timers.wrap(cls, attr, attr)
    timers.wrap(moe.MoE, "__call__", "moe (whole feed-forward)")
    timers.wrap(moe.MoE, "route", "moe.route")
    timers.wrap(moe, "routed_ffn", "moe.routed_ffn")
    for module in users_of_matmuls():
        timers.wrap(module, "matmuls", "matmuls (q/k/v, gate/up groups)")
    timers.wrap(linear.PackedLinear, "__call__", "PackedLinear (o, routers, head, …)")
    timers.wrap(attention_backends.CPUPagedAttention, "decode", "paged decode attention")
    timers.wrap(delta_net.DeltaNet, "__call__", "delta net (whole layer mixer)")
    timers.wrap(layer_ops.CPU_OPS, "delta_rule", "CPU delta rule (recurrence)")
    return timers


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("model", type=Path, help="a .gguf file")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--depth", type=int, default=8, help="prompt tokens per sequence")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf = GGUFFile(args.model)
    config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors)
    model = build_model(gguf, config)
    depth = args.depth
    per = -(-(depth + 1 + args.steps) // PAGE)
    runner = ModelRunner(model, args.batch * per)
    tables = [list(range(b * per, (b + 1) * per)) for b in range(args.batch)]
    g = torch.Generator().manual_seed(0)
    seqs = [
        torch.randint(0, config.vocab_size, (depth,), generator=g).tolist()
        for _ in range(args.batch)
    ]

    def step(pos: int) -> None:
        items = [([s[pos % depth]], pos, tables[b], True) for b, s in enumerate(seqs)]
        runner.run(ForwardBatch.build(items))

    with torch.inference_mode():
        for start in range(0, depth, CHUNK):
            chunk = [(s[start : start + CHUNK], start, tables[b], True) for b, s in enumerate(seqs)]
            runner.run(ForwardBatch.build(chunk))
        step(depth)  # warm-up
        timers = install(model)
        start = time.perf_counter()
        for i in range(args.steps):
            step(depth + 1 + i)
        total = time.perf_counter() - start
        timers.remove()
    ms = 1e3 * total / args.steps
    print(
        f"{args.model.name}: {args.batch} sequences at depth {depth}, {ms:.2f} ms/step, "
        f"{args.batch * args.steps / total:.1f} tok/s"
    )
    for label, sec in sorted(timers.seconds.items(), key=lambda item: -item[1]):
        print(f"  {label:36s} {1e3 * sec / args.steps:8.3f} ms/step {100 * sec / total:5.1f}%")


if __name__ == "__main__":
    main()
