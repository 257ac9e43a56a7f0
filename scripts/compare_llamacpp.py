"""`tandem bench` against llama.cpp's llama-bench, interleaved, same threads, same files.

    python scripts/compare_llamacpp.py [MODEL ...] [-p 64] [-n 32] [-d 0] [-t 2] [--rounds 3]
        [--llama-bench PATH] [--synthetic PATH] [--json]

MODELs are pullable names, stored models or .gguf paths (default: smollm2 gemma3
synthetic). "synthetic" is the 1.1B llama-shaped Q4_0 of scripts/make_synthetic_gguf.py at
--synthetic (default $TANDEM_HOME/synthetic/llama-1b-q4_0.gguf), written first if missing.

Each round runs, per model, one `tandem bench -r 1` process and then one `llama-bench -r 1`
process (A B A B …), so drift in a shared machine's load hits both alike; each process does
its own warm-up. Figures are mean ± sample std over the rounds. Both tools' GB/s use the
bytes of weights one token reads as tandem bench counts them (runtime/cli/bench.py), so the GB/s
ratio equals the tg ratio. RAM bandwidth: the best of several sums of a 1 GiB float32 tensor
(the figure ../shared/DESIGN.md quotes), with the same threads, before and after the models.

llama-bench is looked for at --llama-bench, then /tmp/lcpp/**/build/bin/llama-bench and
~/.cache/tandem-ref/bin/llama-bench (../shared/tools/build-llamacpp.sh's destination).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def candidates() -> list[Path]:
    """Where llama-bench is looked for when --llama-bench is not given."""
    built = sorted(Path("/tmp/lcpp").glob("**/build/bin/llama-bench"))
    return [*built, Path.home() / ".cache" / "tandem-ref" / "bin" / "llama-bench"]


def find_llama_bench(given: str | None) -> Path:
    if given:
        path = Path(given).expanduser()
        if not os.access(path, os.X_OK):
            sys.exit(f"--llama-bench {given}: not an executable file")
        return path
    for path in candidates():
        if os.access(path, os.X_OK):
            return path
    sys.exit(
        "llama-bench not found: build llama.cpp (../shared/tools/build-llamacpp.sh, or "
        "cmake --build build --target llama-bench in its source) and pass --llama-bench"
    )


def tandem_home() -> Path:
    return Path(os.environ.get("TANDEM_HOME") or Path.home() / ".tandem").expanduser()


def model_file(ref: str, synthetic: Path) -> Path:
    """The GGUF path behind a model reference (pulling a known name if needed)."""
    if ref == "synthetic":
        if not synthetic.is_file():
            print(f"writing {synthetic} (a minute or two)", file=sys.stderr, flush=True)
            subprocess.run(
                [
                    sys.executable,
                    str(REPO / "scripts" / "make_synthetic_gguf.py"),
                    "--size",
                    "1b",
                    "--type",
                    "q4_0",
                    "--out",
                    str(synthetic),
                ],
                check=True,
                stderr=subprocess.DEVNULL,
            )
        return synthetic
    from modelfiles.resolver import resolve

    return resolve(ref).path


def run_tandem(path: Path, p: int, n: int, threads: int, depth: int = 0) -> dict:
    """One `tandem bench -r 1 --json` process → its JSON result."""
    cmd = [
        sys.executable,
        "-m",
        "runtime.cli.main",
        "bench",
        str(path),
        "-p",
        str(p),
        "-n",
        str(n),
        "-d",
        str(depth),
        "-t",
        str(threads),
        "-r",
        "1",
        "--json",
    ]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_llama(binary: Path, path: Path, p: int, n: int, threads: int, depth: int = 0) -> dict:
    """One `llama-bench -r 1 -o jsonl` process → {"pp": tok/s, "tg": tok/s}."""
    cmd = [
        str(binary),
        "-m",
        str(path),
        "-p",
        str(p),
        "-n",
        str(n),
        "-t",
        str(threads),
        "-d",
        str(depth),
        "-r",
        "1",
        "-o",
        "jsonl",
    ]
    env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = {}
    for line in out.splitlines():
        if line.startswith("{"):
            test = json.loads(line)
            result["pp" if test["n_prompt"] else "tg"] = test["avg_ts"]
    return result


def ram_bandwidth(threads: int, gib: int = 1, reps: int = 5) -> float:
    """Best read bandwidth (GB/s) of summing a `gib` GiB float32 tensor."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(gib << 28)  # (gib·2^28,) float32 = gib GiB, pages touched
    x.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def stats(samples: list[float]) -> dict:
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return {"mean": statistics.fmean(samples), "std": std, "samples": samples}


def compare(models: dict[str, Path], binary: Path, args: argparse.Namespace) -> list[dict]:
    """Interleaved rounds over every model → one summary row per model."""
    runs = {name: {"tandem": [], "llama": []} for name in models}
    for r in range(args.rounds):
        for name, path in models.items():
            runs[name]["tandem"].append(run_tandem(path, args.p, args.n, args.threads, args.d))
            runs[name]["llama"].append(
                run_llama(binary, path, args.p, args.n, args.threads, args.d)
            )
            t, ll = runs[name]["tandem"][-1], runs[name]["llama"][-1]
            print(
                f"round {r + 1} {name}: tandem pp {t['pp_tok_s']:.1f} tg {t['tg_tok_s']:.1f}"
                f" | llama.cpp pp {ll['pp']:.1f} tg {ll['tg']:.1f}",
                file=sys.stderr,
                flush=True,
            )
    return [summarize(name, models[name], runs[name]) for name in models]


def summarize(name: str, path: Path, runs: dict) -> dict:
    t, ll = runs["tandem"], runs["llama"]
    per_token = t[0]["weight_bytes_per_token"]
    row = {
        "model": name,
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "kernel": t[0]["kernel"],
        "weight_bytes_per_token": per_token,
        "tandem": {
            "pp": stats([x["pp_tok_s"] for x in t]),
            "tg": stats([x["tg_tok_s"] for x in t]),
        },
        "llamacpp": {"pp": stats([x["pp"] for x in ll]), "tg": stats([x["tg"] for x in ll])},
    }
    for test in ("pp", "tg"):
        row[f"{test}_ratio"] = row["tandem"][test]["mean"] / row["llamacpp"][test]["mean"]
    row["tandem_gb_s"] = per_token * row["tandem"]["tg"]["mean"] / 1e9
    row["llamacpp_gb_s"] = per_token * row["llamacpp"]["tg"]["mean"] / 1e9
    return row


def format_table(report: dict) -> str:
    at = f"@d{report['n_depth']}" if report.get("n_depth") else ""
    p, n, ram = f"{report['n_prompt']}{at}", f"{report['n_gen']}{at}", report["ram_gb_s"]
    head = (
        f"| model | MB/token | pp{p} tandem | pp{p} llama.cpp | pp ratio | tg{n} tandem | "
        f"tg{n} llama.cpp | tg ratio | GB/s tandem | GB/s llama.cpp | tandem/RAM |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in report["models"]:
        t, ll = r["tandem"], r["llamacpp"]

        def ms(s):
            return f"{s['mean']:.1f} ± {s['std']:.1f}"

        lines.append(
            f"| {r['model']} | {r['weight_bytes_per_token'] / 1e6:.1f} | {ms(t['pp'])} "
            f"| {ms(ll['pp'])} | {r['pp_ratio']:.2f} | {ms(t['tg'])} | {ms(ll['tg'])} "
            f"| {r['tg_ratio']:.2f} | {r['tandem_gb_s']:.2f} | {r['llamacpp_gb_s']:.2f}"
            f" | {r['tandem_gb_s'] / ram:.0%} |"
        )
    lines.append(
        f"\nRAM read bandwidth ({report['threads']} threads, 1 GiB sum, best): "
        f"{ram:.1f} GB/s (before {report['ram_before']:.1f}, after "
        f"{report['ram_after']:.1f}); kernel: {report['models'][0]['kernel']}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3", "synthetic"])
    ap.add_argument("-p", type=int, default=64, help="prompt tokens (pp test)")
    ap.add_argument("-n", type=int, default=32, help="generated tokens (tg test)")
    ap.add_argument("-d", type=int, default=0, help="tokens in the cache before each test")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved A B rounds")
    ap.add_argument("--llama-bench", help="path of llama.cpp's llama-bench binary")
    ap.add_argument(
        "--synthetic", type=Path, default=tandem_home() / "synthetic" / "llama-1b-q4_0.gguf"
    )
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if min(args.p, args.n, args.threads, args.rounds) < 1 or args.d < 0:
        sys.exit("-p, -n, --threads and --rounds must be at least 1, -d at least 0")
    binary = find_llama_bench(args.llama_bench)
    models = {ref: model_file(ref, args.synthetic) for ref in args.models}
    before = ram_bandwidth(args.threads)
    rows = compare(models, binary, args)
    after = ram_bandwidth(args.threads)
    report = {
        "threads": args.threads,
        "n_prompt": args.p,
        "n_gen": args.n,
        "n_depth": args.d,
        "rounds": args.rounds,
        "llama_bench": str(binary),
        "ram_gb_s": max(before, after),
        "ram_before": before,
        "ram_after": after,
        "models": rows,
    }
    print(json.dumps(report, indent=1) if args.json else format_table(report))


if __name__ == "__main__":
    main()
