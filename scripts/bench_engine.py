"""Engine decode throughput in process (no HTTP): aggregate tokens/s of B sequences decoded
together by LLMEngine, per step, after a warm-up — what continuous batching buys before the
server's costs. --gathered-attention runs decode attention over gathered, padded contexts
(one SDPA call) instead of the native paged kernel, for an A/B of the two.

    python scripts/bench_engine.py smollm2 --batch 1 4 16
    python scripts/bench_engine.py smollm2 --batch 1 16 --gathered-attention
    python scripts/bench_engine.py smollm2 --batch 1 16 --schema --temperature 0.8

--schema constrains every sequence to a JSON schema (an array of at least 500 objects, so no
sequence can end while measured) and reports the grammar's cost per token: the accept check
(every token) and the mask (only when the sampled token was rejected), p50 / p99.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime.kv.attention_backends as attention_backends  # noqa: E402
from runtime.engine.grammar import json_schema  # noqa: E402
from runtime.engine.llm_engine import EngineOptions, LLMEngine  # noqa: E402
from runtime.loaded_model import LoadedModel  # noqa: E402
from runtime.sampling_params import SamplingParams  # noqa: E402

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "score": {"type": "integer", "minimum": 0, "maximum": 100},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "score", "ok"],
        "additionalProperties": False,
    },
    "minItems": 500,
}


def measure(
    lm: LoadedModel, batch: int, context: int, steps: int, schema: bool, temperature: float
) -> tuple[float, list[float], list[float]]:
    """Aggregate decode tokens/s of `batch` sequences whose contexts hold about `context`
    tokens during the measured steps; with `schema`, the grammar's check and mask times (s)."""
    engine = LLMEngine(lm, EngineOptions(num_ctx=context + steps + 64, max_num_seqs=batch))
    grammar = json_schema(SCHEMA, "schema") if schema else None
    params = SamplingParams(
        temperature=temperature,
        seed=0,
        max_tokens=context + steps,
        ignore_eos=True,
        grammar=grammar,
    )
    for i in range(batch):
        ids = lm.tokenizer.encode(f"Story {i}: once upon a time " * 4)[: context // 2]
        engine.add_request(str(i), ids, params)
    while engine.stats.generation_tokens_total < batch * (context // 2):  # grow the contexts
        engine.step()
    seqs = [s for r in engine.requests.values() for s in r.seqs.values()]
    for s in seqs:  # only the measured steps' grammar times
        if s._grammar is not None:
            s._grammar.check_seconds.clear()
            s._grammar.mask_seconds.clear()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    rate = batch * steps / (time.perf_counter() - start)
    checks = [t for s in seqs if s._grammar for t in s._grammar.check_seconds]
    masks = [t for s in seqs if s._grammar for t in s._grammar.mask_seconds]
    return rate, checks, masks


def _pct(values: list[float], q: float) -> float:
    """The q-quantile of values in microseconds (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--context", type=int, default=128, help="tokens per sequence while measured")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gathered-attention", action="store_true")
    ap.add_argument("--schema", action="store_true", help="constrain output to a JSON schema")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", "-t", type=int, default=0, help="forward threads (0: torch's)")
    args = ap.parse_args()
    if args.gathered_attention:
        attention_backends.paged_decode_attention = lambda *a, **k: None
    lm = LoadedModel.load(args.model, base={"num_thread": args.threads} if args.threads else None)
    kind = "gathered SDPA" if args.gathered_attention else "native paged"
    for b in args.batch:
        rate, checks, masks = measure(
            lm, b, args.context, args.steps, args.schema, args.temperature
        )
        line = (
            f"{lm.name[:24]}: batch {b:3d}, context ~{args.context}, {kind} attention: "
            f"{rate:7.1f} tok/s aggregate"
        )
        if args.schema:
            line += (
                f"; schema: check p50 {_pct(checks, 0.5):.0f} us p99 {_pct(checks, 0.99):.0f} us"
                f", mask on {len(masks)}/{len(checks)} tokens p50 {_pct(masks, 0.5):.0f} us"
                f" p99 {_pct(masks, 0.99):.0f} us"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
