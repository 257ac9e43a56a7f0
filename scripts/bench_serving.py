"""Serving benchmark: aggregate tokens/s and time to first token at several concurrencies,
against any OpenAI-compatible server — tandem's (`tandem serve`) or llama.cpp's llama-server.

    python scripts/bench_serving.py --url http://127.0.0.1:11435 --model smollm2
    python scripts/bench_serving.py --url http://127.0.0.1:8080 --model x --json  # llama-server

Each level sends `--rounds` x concurrency streamed chat requests from a fixed prompt set, at
most `concurrency` in flight, each asking for exactly --max-tokens tokens (ignore_eos, which
both servers accept) at temperature 0. Per level: aggregate generated tokens / wall time,
p50/p95 time to first token (request sent -> first content chunk), and the mean per-stream
decode rate. Tokens are counted from the usage the server reports when it sends one,
otherwise as content chunks (one token each on both servers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a haiku about autumn.",
    "What is the capital of Australia?",
    "Give three tips for learning a language.",
    "Describe a cat to someone who has never seen one.",
    "How does a bicycle stay upright?",
    "Summarize the plot of Romeo and Juliet.",
    "What is a prime number?",
    "List some uses of baking soda.",
    "Why do we have seasons?",
    "Tell me a short story about a robot.",
    "What makes bread rise?",
    "How do airplanes fly?",
    "What is the difference between weather and climate?",
    "Suggest a name for a coffee shop.",
    "Why is exercise good for you?",
]


@dataclass
class Result:
    ttft: float  # seconds to the first content chunk
    seconds: float  # whole request
    tokens: int


@dataclass
class Level:
    concurrency: int
    requests: int
    wall_seconds: float
    tokens: int
    aggregate_tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    stream_tok_s: float  # mean over requests of tokens after the first / decode time


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            usage = obj.get("usage") or usage
            if any((c.get("delta") or {}).get("content") for c in obj.get("choices") or []):
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - start
    seconds = time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else chunks
    return Result(ttft if ttft is not None else seconds, seconds, tokens)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(url: str, model: str, concurrency: int, rounds: int, max_tokens: int) -> Level:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(concurrency * rounds)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(url, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    tokens = sum(r.tokens for r in results)
    rates = [
        (r.tokens - 1) / (r.seconds - r.ttft)
        for r in results
        if r.tokens > 1 and r.seconds > r.ttft
    ]
    ttfts = [r.ttft for r in results]
    return Level(
        concurrency,
        len(results),
        wall,
        tokens,
        tokens / wall,
        percentile(ttfts, 0.5),
        percentile(ttfts, 0.95),
        statistics.fmean(rates) if rates else 0.0,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:11435", help="server base URL")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1, help="requests sent before measuring")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    for _ in range(args.warmup):
        one_request(url, args.model, PROMPTS[0], 4)
    levels = [
        run_level(url, args.model, int(c), args.rounds, args.max_tokens)
        for c in args.concurrency.split(",")
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "url": url,
                    "model": args.model,
                    "max_tokens": args.max_tokens,
                    "levels": [asdict(lv) for lv in levels],
                },
                indent=2,
            )
        )
        return 0
    print(f"{url}  model={args.model}  max_tokens={args.max_tokens}")
    print(
        f"{'conc':>4} {'reqs':>5} {'tokens':>7} {'wall s':>7} {'agg tok/s':>9} "
        f"{'ttft p50':>8} {'ttft p95':>8} {'stream tok/s':>12}"
    )
    for lv in levels:
        print(
            f"{lv.concurrency:>4} {lv.requests:>5} {lv.tokens:>7} {lv.wall_seconds:>7.2f} "
            f"{lv.aggregate_tok_s:>9.1f} {lv.ttft_p50_s:>8.3f} {lv.ttft_p95_s:>8.3f} "
            f"{lv.stream_tok_s:>12.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
