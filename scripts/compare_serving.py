"""Serving throughput, interleaved: `tandem serve` and llama.cpp's `llama-server` on the same
GGUF and threads, both driven over HTTP by bench_serving.py, beside tandem's engine in process
(bench_engine.py, no HTTP) — what issue 15 asks of the server.

    python scripts/compare_serving.py smollm2 -t 2 --levels 1,4,16 --rounds 3

Both servers are started once (loopback, 16 slots, the same context per slot) and kept up;
each round runs every level on tandem, then on llama-server, then the in-process engine at the
same batch sizes, so a noisy machine moves all three alike. Printed per level: the median
aggregate tok/s of each, tandem over llama-server, and tandem's HTTP rate over its in-process
rate. --json prints every round's figures.

Aggregate tok/s over HTTP counts whole requests (the chat prompt's prefill and the streamed
answer of --max-tokens tokens, ignore_eos) over the level's wall time. Two in-process figures
stand beside it: "same work" runs the very same requests (the same chat prompts, the same
number at once, the same max_tokens) through tandem's engine in a process of its own, no
HTTP — what the server's costs are measured against; "decode" is bench_engine.py's steady
decode steps at a context of about --context tokens (no prefill), an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_serving  # noqa: E402

LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN", Path.home() / ".cache/tandem-ref/bin"))


def gguf_path(model: str) -> Path:
    """The model's GGUF file: a path as given, else tandem's store (pulled if missing)."""
    if Path(model).is_file():
        return Path(model)
    from loaders.pull import pull

    return pull(model)


@contextmanager
def server(cmd: list[str], url: str, log: Path, env: dict | None = None):
    """Run `cmd` until the block ends; ready when `url`/health answers 200."""
    with log.open("w") as out:
        # cwd: `python -m` puts the working directory first on sys.path, before PYTHONPATH;
        # from this checkout, the server runs this checkout's code wherever this is run from
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            wait_healthy(url, proc, log)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not healthy after {timeout:.0f} s; see {log}")


def served_model(url: str) -> str:
    """The id of the first model the server lists (/v1/models)."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def in_process(model: str, levels: list[int], threads: int, context: int, steps: int) -> dict:
    """bench_engine.py's aggregate decode tok/s per batch size, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "scripts/bench_engine.py"), model, "--batch"]
    cmd += [str(b) for b in levels] + ["--context", str(context), "--steps", str(steps)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    rates = {}
    for line in out.splitlines():  # "...: batch   4, context ~128, ...:   31.2 tok/s aggregate"
        if "tok/s aggregate" in line:
            batch = int(line.split("batch")[1].split(",")[0])
            rates[batch] = float(line.split(":")[-1].split("tok/s")[0])
    return rates


def same_work(model: str, levels: list[int], threads: int, requests: int, tokens: int) -> dict:
    """The HTTP levels' requests run through the engine in a fresh process (no server)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, model, "--same-work", "-t", str(threads)]
    cmd += ["--levels", ",".join(map(str, levels)), "--requests", str(requests)]
    cmd += ["--max-tokens", str(tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return {int(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def run_same_work(model: str, levels: list[int], threads: int, requests: int, tokens: int) -> dict:
    """In this process: per level, `requests` waves of `level` chat requests submitted at once
    and run to their end (as the HTTP client keeps `level` in flight); generated tok/s."""
    from runtime.llm import LLM
    from runtime.sampling_params import SamplingParams

    llm = LLM(model, num_ctx=2048, num_thread=threads, num_parallel=max(levels))
    prompts = [
        llm.lm.chat_prompt_ids([{"role": "user", "content": p}]) for p in bench_serving.PROMPTS
    ]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    run_waves(llm, [prompts[0]], SamplingParams(temperature=0, max_tokens=4))  # warm
    rates = {}
    for c in levels:
        start, generated = time.perf_counter(), 0
        for r in range(requests):
            wave = [prompts[(r * c + i) % len(prompts)] for i in range(c)]
            generated += run_waves(llm, wave, params)
        rates[c] = generated / (time.perf_counter() - start)
    return rates


def run_waves(llm, prompts: list[list[int]], params) -> int:
    """Submit every prompt at once, step the engine until all finish; tokens generated."""
    for i, ids in enumerate(prompts):
        llm.engine.add_request(f"w{i}", ids, params)
    generated = 0
    while llm.engine.has_unfinished:
        for event in llm.engine.step():
            if event.error is not None:
                raise event.error
            generated += event.delta is not None and event.delta.token_id is not None
    return generated


def http_levels(url: str, model: str, levels: list[int], rounds: int, tokens: int) -> dict:
    bench_serving.one_request(url, model, bench_serving.PROMPTS[0], 4)  # warm
    return {
        c: bench_serving.run_level(url, model, c, rounds, tokens).aggregate_tok_s for c in levels
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("model", help="a tandem model name or a .gguf path")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--requests", type=int, default=2, help="requests per stream per level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=128, help="in-process context while measured")
    ap.add_argument("--ctx-per-slot", type=int, default=1024)
    ap.add_argument("--logs", type=Path, default=Path("/tmp/compare_serving"))
    ap.add_argument("--no-llama", action="store_true", help="tandem and in-process only")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--same-work", action="store_true", help=argparse.SUPPRESS)  # the child
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.same_work:
        rates = run_same_work(args.model, levels, args.threads, args.requests, args.max_tokens)
        print(json.dumps(rates))
        return 0
    path = gguf_path(args.model).resolve()
    args.logs.mkdir(parents=True, exist_ok=True)
    slots = max(levels)
    t_url, l_url = "http://127.0.0.1:18435", "http://127.0.0.1:18436"
    tandem = [sys.executable, "-m", "runtime.cli.main", "serve", "--model", str(path)]
    tandem += ["--port", "18435", "-t", str(args.threads), "-np", str(slots), "--no-webui"]
    tandem += ["-c", str(args.ctx_per_slot)]
    llama = [str(LLAMA_BIN / "llama-server"), "-m", str(path), "--port", "18436"]
    llama += ["-t", str(args.threads), "-np", str(slots), "-c", str(slots * args.ctx_per_slot)]
    llama += ["--no-webui", "-fa", "off"]
    env = dict(os.environ, PYTHONPATH=str(REPO), LD_LIBRARY_PATH=str(LLAMA_BIN))
    rounds: list[dict] = []
    with ExitStack() as stack:
        stack.enter_context(server(tandem, t_url, args.logs / "tandem.log", env))
        if not args.no_llama:
            stack.enter_context(server(llama, l_url, args.logs / "llama.log", env))
        for r in range(args.rounds):
            row = {
                "tandem": http_levels(
                    t_url, served_model(t_url), levels, args.requests, args.max_tokens
                )
            }
            if not args.no_llama:
                row["llama"] = http_levels(l_url, "x", levels, args.requests, args.max_tokens)
            row["same"] = same_work(str(path), levels, args.threads, args.requests, args.max_tokens)
            row["engine"] = in_process(str(path), levels, args.threads, args.context, 30)
            rounds.append(row)
            print(f"round {r + 1}: {json.dumps(row)}", file=sys.stderr, flush=True)
    report(rounds, levels, args)
    return 0


def report(rounds: list[dict], levels: list[int], args: argparse.Namespace) -> None:
    med = {k: {c: statistics.median(r[k][c] for r in rounds) for c in levels} for k in rounds[0]}
    if args.json:
        print(json.dumps({"rounds": rounds, "median": med}, indent=2))
        return
    print(f"{args.model}  -t {args.threads}  max_tokens {args.max_tokens}  rounds {args.rounds}")
    head = f"{'streams':>7} {'tandem':>8} {'llama-srv':>9} {'same work':>9} {'decode':>8}"
    print(head + f" {'t/llama':>8} {'http/same':>9} {'http/decode':>11}")
    for c in levels:
        t, same, e = med["tandem"][c], med["same"][c], med["engine"][c]
        lsrv = med.get("llama", {}).get(c)
        ratio = f"{t / lsrv:7.2f}x" if lsrv else "       -"
        print(
            f"{c:>7} {t:>8.1f} {lsrv or 0:>9.1f} {same:>9.1f} {e:>8.1f} {ratio} "
            f"{t / same:>9.0%} {t / e:>11.0%}"
        )


if __name__ == "__main__":
    sys.exit(main())
