"""Serving throughput, interleaved: `tandem serve` and llama.cpp's `llama-server` on the same
GGUF and threads, both driven over HTTP by bench_serving.py, beside tandem's engine in process
(bench_engine.py, no HTTP) — what issue 15 asks of the server.

    python scripts/compare_serving.py smollm2 -t 2 --levels 1,4,16 --rounds 3

Both servers are started once (loopback, 16 slots, the same context per slot) and kept up;
each round runs every level on tandem, then on llama-server, then the in-process engine at the
same batch sizes, so a noisy machine moves all three alike. Printed per level: the median
aggregate tok/s of each, tandem over llama-server, and tandem's HTTP rate over its in-process
rate. --json prints every round's figures.

Aggregate tok/s over HTTP counts whole requests (prompt, prefill and the streamed answer of
--max-tokens tokens, ignore_eos) over the level's wall time; in process it is decode steps
alone at a context of about --context tokens, so the HTTP share is a lower bound of the
server's efficiency.
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
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
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
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    path = gguf_path(args.model)
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
    print(
        f"{'streams':>7} {'tandem':>8} {'llama-srv':>9} {'engine':>8} {'t/llama':>8} {'http/eng':>8}"
    )
    for c in levels:
        t, e = med["tandem"][c], med["engine"][c]
        lsrv = med.get("llama", {}).get(c)
        ratio = f"{t / lsrv:7.2f}x" if lsrv else "       -"
        print(f"{c:>7} {t:>8.1f} {lsrv or 0:>9.1f} {e:>8.1f} {ratio} {t / e:>7.0%}")


if __name__ == "__main__":
    sys.exit(main())
