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

`--multi-turn CxT` runs a multi-turn workload instead: C conversations at once, each T
turns (one shared system prompt, its own first question, each answer appended and a follow-up
asked). Against `tandem serve --ray` it reports the prefix-cache hit rate (prompt tokens the
replicas served from their prefix caches, read from x-tandem-prefix-cache-hits, over all
prompt tokens) and how often a conversation changed replica (x-tandem-replica); start the
server fresh for each run, as the replicas' counters include earlier requests.
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


SYSTEM = (
    "You are a patient, precise assistant for a team of engineers. Answer in plain language, "
    "give one concrete example when it helps, and keep every answer short."
)
REPLICA_HEADER = "x-tandem-replica"
HITS_HEADER = "x-tandem-prefix-cache-hits"


@dataclass
class Conversations:
    conversations: int
    turns: int
    prompt_tokens: int
    cached_tokens: int  # summed over replicas, from the last header each one sent
    hit_rate: float
    replica_changes: int  # turns served by another replica than the turn before
    wall_seconds: float


def one_turn(url: str, model: str, messages: list, max_tokens: int) -> tuple[dict, dict]:
    """One non-streamed chat turn: (its JSON body, its response headers)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}


def conversation(url: str, model: str, index: int, turns: int, max_tokens: int) -> list:
    """One conversation's turns: [(prompt tokens, replica, that replica's hits so far)]."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": PROMPTS[index % len(PROMPTS)]},
    ]
    out = []
    for turn in range(turns):
        body, headers = one_turn(url, model, messages, max_tokens)
        hits = int(headers.get(HITS_HEADER, 0))
        out.append((body["usage"]["prompt_tokens"], headers.get(REPLICA_HEADER), hits))
        answer = body["choices"][0]["message"]["content"] or ""
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"Tell me more, point {turn + 1}."},
        ]
    return out


def run_conversations(url: str, model: str, spec: str, max_tokens: int) -> Conversations:
    count, turns = (int(x) for x in spec.lower().split("x"))
    start = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        runs = list(
            pool.map(lambda i: conversation(url, model, i, turns, max_tokens), range(count))
        )
    wall = time.perf_counter() - start
    hits: dict[str, int] = {}
    for _, replica, seen in (t for run in runs for t in run):
        hits[str(replica)] = max(hits.get(str(replica), 0), seen)
    prompt = sum(t[0] for run in runs for t in run)
    changes = sum(a[1] != b[1] for run in runs for a, b in zip(run, run[1:], strict=False))
    cached = sum(hits.values())
    return Conversations(count, turns, prompt, cached, cached / max(prompt, 1), changes, wall)


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
    ap.add_argument(
        "--multi-turn",
        metavar="CxT",
        help="instead: C concurrent conversations of T turns; prefix-cache hit rate",
    )
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    if args.multi_turn:
        return report_conversations(url, args)
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


def report_conversations(url: str, args: argparse.Namespace) -> int:
    result = run_conversations(url, args.model, args.multi_turn, args.max_tokens)
    if args.json:
        print(json.dumps({"url": url, "model": args.model, **asdict(result)}, indent=2))
        return 0
    print(
        f"{url}  model={args.model}  {result.conversations} conversations x {result.turns} "
        f"turns  max_tokens={args.max_tokens}  wall {result.wall_seconds:.1f} s"
    )
    print(
        f"prompt tokens {result.prompt_tokens}  from prefix caches {result.cached_tokens}  "
        f"hit rate {result.hit_rate:.1%}  replica changes {result.replica_changes}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
