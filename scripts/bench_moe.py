"""CPU decode of a mixture-of-experts model: one sequence against N concurrent ones, through
the paged runner (runtime/execution/model_runner.py), with the routed experts' bytes read per
step from the stream counter (kernels/experts.py) and the GB/s they make.

    python scripts/bench_moe.py --arch qwen3moe --layers 4 --dim 1024 --experts 64 \
        --expert-ffn 384 --used 8 --type q4_0 --batch 16 --steps 8
    python scripts/bench_moe.py --size 30b-a3b --layers 7 --type q4_0 --out q3moe-7l.gguf
        # Qwen3-30B-A3B's layer (2048, 128 experts of 768, 8 used), 7 layers: 2.4 GB of experts

The model is make_synthetic_gguf's --arch entry at the given dims (written once to --out).
Figures: decode tokens/s single stream and aggregate at --batch, the aggregate's ratio, the
experts' bytes per step and their GB/s (the active weights: each chosen expert once per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import make_synthetic_gguf as msg  # noqa: E402
from synthetic_archs import ARCHITECTURES  # noqa: E402

from kernels.experts import expert_stats  # noqa: E402
from loaders.config import ModelConfig  # noqa: E402
from loaders.gguf_file import GGUFFile  # noqa: E402
from runtime.execution.model_runner import ModelRunner  # noqa: E402
from runtime.kv.forward_batch import ForwardBatch  # noqa: E402
from runtime.models import build_model  # noqa: E402

PROMPT = 8


def decode(runner: ModelRunner, n: int, steps: int, vocab: int) -> tuple[float, dict]:
    """Seconds per decode step of n sequences (after a prefill), and the experts' counters."""
    per = -(-(PROMPT + 1 + steps) // 16)  # 16-token pages per sequence
    tables = [list(range(b * per, (b + 1) * per)) for b in range(n)]
    g = torch.Generator().manual_seed(n)
    seqs = [torch.randint(0, vocab, (PROMPT,), generator=g).tolist() for _ in range(n)]
    with torch.inference_mode():
        runner.run(ForwardBatch.build([(s, 0, tables[b], True) for b, s in enumerate(seqs)]))
        runner.run(
            ForwardBatch.build([([s[0]], PROMPT, tables[b], True) for b, s in enumerate(seqs)])
        )
        expert_stats(reset=True)  # after a warm-up step (its position is decoded again below)
        start = time.perf_counter()
        for step in range(steps):
            items = [
                ([s[step % PROMPT]], PROMPT + step, tables[b], True) for b, s in enumerate(seqs)
            ]
            runner.run(ForwardBatch.build(items))
        seconds = (time.perf_counter() - start) / steps
    return seconds, expert_stats(reset=True)


def dims_for(arch, args: argparse.Namespace):
    """The model's dims: a real size's (all but --layers and what is given) or the small
    default shape (dim 1024, 64 experts of 384, 8 used) on the entry's attention."""
    if args.size:
        if args.size not in arch.sizes:
            raise SystemExit(
                f"--size {args.size} is not a size of {arch.name}: {sorted(arch.sizes)}"
            )
        base = arch.sizes[args.size]
        given = {"dim": args.dim, "experts": args.experts, "experts_used": args.used}
        given |= {"expert_ffn": args.expert_ffn}
        over = {k: v for k, v in given.items() if v is not None}
        return dataclasses.replace(base, layers=args.layers, **over)
    ffn = args.expert_ffn or 384
    return dataclasses.replace(
        arch.dims,
        layers=args.layers,
        dim=args.dim or 1024,
        ffn=ffn,
        experts=args.experts or 64,
        experts_used=args.used or 8,
        expert_ffn=ffn,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="qwen3moe", choices=["qwen3moe", "gpt-oss"])
    ap.add_argument(
        "--size",
        choices=sorted({size for a in ARCHITECTURES.values() for size in a.sizes}),
        help="start from a real size's dims (qwen3moe 30b-a3b, gpt-oss 20b), not 1024/64",
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, help="default 1024 (or the size's)")
    ap.add_argument("--experts", type=int, help="default 64 (or the size's)")
    ap.add_argument("--expert-ffn", type=int, help="default 384 (or the size's)")
    ap.add_argument("--used", type=int, help="default 8 (or the size's)")
    ap.add_argument("--type", default="q4_0", choices=sorted(msg.TYPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="single/batch rounds, interleaved")
    ap.add_argument("--vocab", type=Path, help="tokenizer source (default: pulled SmolLM2)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_moe.gguf"))
    args = ap.parse_args()
    arch = ARCHITECTURES[args.arch]
    dims = dims_for(arch, args)
    if not args.out.exists():
        vocab = args.vocab or msg.default_tokenizer()
        msg.make_arch(args.out, arch, msg.TYPES[args.type], vocab, dims)
    gguf = GGUFFile(args.out)
    config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors)
    model = build_model(gguf, config)
    experts = sum(t.nbytes for n, t in gguf.tensors.items() if "_exps" in n)
    runner = ModelRunner(model, args.batch * -(-(PROMPT + 1 + args.steps) // 16))
    runs = [  # single stream and batch interleaved, the best round of each (a noisy machine)
        (
            decode(runner, 1, args.steps, config.vocab_size),
            decode(runner, args.batch, args.steps, config.vocab_size),
        )
        for _ in range(args.rounds)
    ]
    one, s1 = min((r[0] for r in runs), key=lambda r: r[0])
    many, sn = min((r[1] for r in runs), key=lambda r: r[0])
    for i, (a, b) in enumerate(runs):
        print(
            f"  round {i + 1}: 1 sequence {1 / a[0]:.1f} tok/s, {args.batch} sequences {args.batch / b[0]:.1f} tok/s"
        )
    print(f"{args.out.name}: {args.arch}, experts {experts / 1e9:.3f} GB in {args.type}")
    for n, sec, st in ((1, one, s1), (args.batch, many, sn)):
        per_step = st["bytes"] / args.steps
        print(
            f"  {n:3d} sequences: {sec * 1e3:8.1f} ms/step, {n / sec:8.1f} tokens/s, experts "
            f"{per_step / 1e6:7.1f} MB/step ({st['streams'] / args.steps:.0f} expert streams) "
            f"= {per_step / sec / 1e9:.2f} GB/s"
        )
    print(f"  aggregate / single stream: {(args.batch / many) / (1 / one):.2f}×")


if __name__ == "__main__":
    main()
