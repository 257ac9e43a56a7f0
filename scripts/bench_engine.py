"""Engine decode throughput in process (no HTTP): aggregate tokens/s of B sequences decoded
together by LLMEngine, per step, after a warm-up — what continuous batching buys before the
server's costs. --gathered-attention runs decode attention over gathered, padded contexts
(one SDPA call) instead of the native paged kernel, for an A/B of the two.

    python scripts/bench_engine.py smollm2 --batch 1 4 16
    python scripts/bench_engine.py smollm2 --batch 1 16 --gathered-attention
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime.kv.attention_backends as attention_backends  # noqa: E402
from runtime.engine.llm_engine import EngineOptions, LLMEngine  # noqa: E402
from runtime.loaded_model import LoadedModel  # noqa: E402
from runtime.sampling_params import SamplingParams  # noqa: E402


def measure(lm: LoadedModel, batch: int, context: int, steps: int) -> float:
    """Aggregate decode tokens/s of `batch` sequences whose contexts hold about `context`
    tokens during the measured steps."""
    engine = LLMEngine(lm, EngineOptions(num_ctx=context + steps + 64, max_num_seqs=batch))
    params = SamplingParams(temperature=0, max_tokens=context + steps, ignore_eos=True)
    for i in range(batch):
        ids = lm.tokenizer.encode(f"Story {i}: once upon a time " * 4)[: context // 2]
        engine.add_request(str(i), ids, params)
    while engine.stats.generation_tokens_total < batch * (context // 2):  # grow the contexts
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--context", type=int, default=128, help="tokens per sequence while measured")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gathered-attention", action="store_true")
    args = ap.parse_args()
    if args.gathered_attention:
        attention_backends.paged_decode_attention = lambda *a, **k: None
    lm = LoadedModel.load(args.model)
    kind = "gathered SDPA" if args.gathered_attention else "native paged"
    for b in args.batch:
        rate = measure(lm, b, args.context, args.steps)
        print(
            f"{lm.name[:24]}: batch {b:3d}, context ~{args.context}, {kind} attention: "
            f"{rate:7.1f} tok/s aggregate",
            flush=True,
        )


if __name__ == "__main__":
    main()
