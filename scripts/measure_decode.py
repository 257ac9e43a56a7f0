"""Decode speed and resident memory of tandem on a model, one fresh process per model.

    python scripts/measure_decode.py smollm2 gemma3 [--tokens 64] [--json]

Resident memory added by loading = RSS after load and a generation, minus RSS just before
the load (torch already imported); the budget is 1.3 × the GGUF file size plus the KV cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(model: str, tokens: int, num_ctx: int) -> dict:
    import psutil
    import torch  # noqa: F401  (imported before the baseline, as the budget says)

    from runtime import LLM, SamplingParams

    proc = psutil.Process()
    before = proc.memory_info().rss
    llm = LLM(model, num_ctx=num_ctx)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    out = llm.generate(["The history of the printing press"], params)[0].outputs[0]
    t = out.timings
    added = proc.memory_info().rss - before
    from runtime.kv.kv_pool import kv_bytes_per_token

    kv = num_ctx * kv_bytes_per_token(llm.lm.config, "f16")  # one sequence's f16 KV
    size = llm.lm.path.stat().st_size
    return {
        "model": model,
        "file_bytes": size,
        "kv_cache_bytes": kv,
        "rss_added_bytes": added,
        "budget_bytes": int(1.3 * size + kv),
        "within_budget": added <= 1.3 * size + kv,
        "prompt_tok_s": t.prompt_tokens / t.prompt_seconds,
        "decode_tok_s": t.eval_tokens / t.eval_seconds,
        "decode_tokens": t.eval_tokens,
        "weights_gb_s": llm.lm.model.weight_bytes * t.eval_tokens / t.eval_seconds / 1e9,
        "threads": __import__("torch").get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--num-ctx", type=int, default=4096)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.models[0], args.tokens, args.num_ctx)))
        return
    for model in args.models:  # a fresh process each, so one load's memory cannot hide another's
        cmd = [
            sys.executable,
            __file__,
            model,
            "--child",
            "--tokens",
            str(args.tokens),
            "--num-ctx",
            str(args.num_ctx),
        ]
        res = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
            .stdout.strip()
            .splitlines()[-1]
        )
        if args.json:
            print(json.dumps(res))
            continue
        mb = 1 / 2**20
        print(
            f"{model}: decode {res['decode_tok_s']:.2f} tok/s ({res['weights_gb_s']:.2f} GB/s "
            f"of weights), prompt {res['prompt_tok_s']:.1f} tok/s, {res['threads']} threads; "
            f"RSS added {res['rss_added_bytes'] * mb:.0f} MiB vs budget "
            f"{res['budget_bytes'] * mb:.0f} MiB (file {res['file_bytes'] * mb:.0f} MiB + KV "
            f"{res['kv_cache_bytes'] * mb:.0f} MiB): "
            f"{'ok' if res['within_budget'] else 'OVER'}"
        )


if __name__ == "__main__":
    main()
