"""Conformance against llama.cpp: tandem's logits on a model against llama.cpp's, by
llama-perplexity's KL-divergence mode, beside llama.cpp's own floor.

    python scripts/conformance.py --arch llama --arch qwen2      # or --all, or --gguf FILE
    python scripts/conformance.py --all --record                 # rewrite the CI fixtures

For each model (a synthetic one of the architecture, scripts/make_synthetic_gguf.py --arch,
seeded, SmolLM2's tokenizer; or a GGUF given):
1. `llama-perplexity -f TEXT -c N --chunks K --kl-divergence-base base.kl -fa off -t 2`
   saves llama.cpp's log-probabilities of every scored position;
2. llama.cpp's floor: the same model under other llama.cpp settings (`-fa on`, and `-t 1`)
   against that file (`--kl-divergence`): how far llama.cpp moves from itself;
3. tandem (runtime/perplexity.py, in process) against the same file.
The table: mean KL(llama.cpp‖tandem) ±, top-1 agreement, PPL ratio, and the floor's KL and
top-1 (the larger of the two settings'), llama.cpp's mean top-1 probability (the model must
be confident, ≥ 0.3, or agreement means little) and the verdict: KL ≤ 2× floor (or ≤
ABS_KL where the floor is 0) and top-1 ≥ 99%.

--record writes tests/data/conformance/ARCH.json (llama.cpp's figures, the commands, the
GGUF's sha256) and ARCH.npz: the base file in a compact, exact form (conformance_fixture.py)
that tests/test_conformance.py compares tandem against without llama.cpp.
llama.cpp: ~/.cache/tandem-ref/bin (../shared/tools/build-llamacpp.sh) or --llama-bin DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import conformance_fixture  # noqa: E402
import make_synthetic_gguf  # noqa: E402
from synthetic_archs import ARCHITECTURES  # noqa: E402

from loaders.kl_base import KLBase  # noqa: E402

TEXT = REPO.parent / "shared" / "fixtures" / "apache-2.0.txt"
LLAMA_BIN = Path.home() / ".cache" / "tandem-ref" / "bin"
FIXTURE_DIR = REPO / "tests" / "data" / "conformance"
N_CTX, N_CHUNKS, THREADS = 64, 4, 2  # 4 × 31 = 124 scored positions (llama.cpp wants ≥ 100)
ABS_KL = 1e-4  # the bound where llama.cpp's floor is exactly 0 (see tests/test_conformance.py)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llama_perplexity(bin_dir: Path, args: list[str]) -> str:
    """Run llama-perplexity; its whole output (stdout and stderr)."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(bin_dir))
    cmd = [str(bin_dir / "llama-perplexity"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def parse_kl(out: str) -> dict:
    """llama-perplexity --kl-divergence's final figures."""

    def pair(pattern: str) -> list[float]:
        m = re.search(pattern + r"\s*:?\s*([-\d.e+]+)\s*±\s*([-\d.e+]+)", out)
        if m is None:
            raise RuntimeError(f"no '{pattern}' in llama-perplexity's output:\n{out[-2000:]}")
        return [float(m.group(1)), float(m.group(2))]

    same = pair(r"Same top p")
    return {
        "kld": pair(r"Mean    KLD"),
        "same_top": [same[0] / 100, same[1] / 100],
        "ppl_ratio": pair(r"Mean PPL\(Q\)/PPL\(base\)"),
        "ppl": pair(r"Mean PPL\(Q\)"),
        "ppl_base": pair(r"Mean PPL\(base\)"),
    }


def parse_ppl(out: str) -> list[float]:
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"no final PPL in llama-perplexity's output:\n{out[-2000:]}")
    return [float(m.group(1)), float(m.group(2))]


def llama_runs(bin_dir: Path, gguf: Path, text: Path, base: Path, n_ctx: int, chunks: int):
    """llama.cpp's base file and its floors: (commands, base PPL, {setting: figures})."""
    common = ["-m", str(gguf), "-c", str(n_ctx), "-b", str(n_ctx), "-ub", str(n_ctx)]
    save = [*common, "-f", str(text), "--chunks", str(chunks), "--kl-divergence-base", str(base)]
    save += ["-fa", "off", "-t", str(THREADS)]
    compare = [*common, "--kl-divergence-base", str(base), "--kl-divergence"]
    settings = {"-fa on": ["-fa", "on", "-t", str(THREADS)], "-t 1": ["-fa", "off", "-t", "1"]}
    commands = {"base": save} | {k: compare + v for k, v in settings.items()}
    ppl = parse_ppl(llama_perplexity(bin_dir, save))
    floors = {k: parse_kl(llama_perplexity(bin_dir, commands[k])) for k in settings}
    shown = {k: "llama-perplexity " + " ".join(v) for k, v in commands.items()}
    return shown, ppl, floors


def tandem_kl(gguf: Path, base: KLBase) -> dict:
    from runtime.loaded_model import LoadedModel
    from runtime.perplexity import kl_divergence
    from runtime.run_options import RunOptions

    lm = LoadedModel.load(gguf, options=RunOptions.resolve(flags={"num_thread": THREADS}))
    return kl_divergence(lm, base)


def verdict(kl: float, top: float, floor_kl: float) -> bool:
    bound = 2 * floor_kl if floor_kl > 0 else ABS_KL
    return kl <= bound and top >= 0.99


def run_one(name: str, gguf: Path, args: argparse.Namespace, work: Path) -> dict:
    base_path = work / f"{name}.base.kl"
    commands, ppl, floors = llama_runs(
        args.llama_bin, gguf, args.text, base_path, args.ctx_size, args.chunks
    )
    base = KLBase.read(base_path)
    tandem = tandem_kl(gguf, base)
    floor_kl = max(f["kld"][0] for f in floors.values())
    floor_top = min(f["same_top"][0] for f in floors.values())
    row = {
        "name": name,
        "gguf_sha256": sha256(gguf),
        "n_ctx": args.ctx_size,
        "chunks": args.chunks,
        "llama_ppl": ppl,
        "llama_mean_top_p": tandem["base_mean_top_p"],
        "floors": floors,
        "floor_kld": floor_kl,
        "floor_same_top": floor_top,
        "tandem": tandem,
        "pass": verdict(tandem["kld"][0], tandem["same_top"][0], floor_kl),
        "commands": commands,
    }
    if args.record:
        FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
        conformance_fixture.save(base, FIXTURE_DIR / f"{name}.npz")
        (FIXTURE_DIR / f"{name}.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'model':<9} {'KL tandem':>22} {'top-1':>7} {'PPL ratio':>9} {'floor KL':>10} "
        f"{'floor top-1':>11} {'llama top-p':>11}  goal"
    )
    lines = [head]
    for r in rows:
        t = r["tandem"]
        lines.append(
            f"{r['name']:<9} {t['kld'][0]:10.3e} ± {t['kld'][1]:9.2e} "
            f"{100 * t['same_top'][0]:6.2f}% {t['ppl_ratio'][0]:9.5f} {r['floor_kld']:10.3e} "
            f"{100 * r['floor_same_top']:10.2f}% {r['llama_mean_top_p']:11.3f}  "
            f"{'PASS' if r['pass'] else 'FAIL'}"
        )
    return "\n".join(lines)


def synthetic(arch: str, work: Path, vocab: Path | None) -> Path:
    out = work / f"{arch}.gguf"
    entry = ARCHITECTURES[arch]
    src = vocab or make_synthetic_gguf.default_tokenizer()
    qtype = make_synthetic_gguf.TYPES[conformance_fixture.WEIGHT_TYPE]
    make_synthetic_gguf.make_arch(out, entry, qtype, src, entry.dims, conformance_fixture.SEED)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", action="append", default=[], choices=sorted(ARCHITECTURES))
    ap.add_argument("--all", action="store_true", help="every architecture of the table")
    ap.add_argument("--gguf", type=Path, action="append", default=[], help="a model file")
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("-c", "--ctx-size", type=int, default=N_CTX)
    ap.add_argument("--chunks", type=int, default=N_CHUNKS)
    ap.add_argument("--vocab", type=Path, help="tokenizer source (default: pulled SmolLM2)")
    ap.add_argument("--llama-bin", type=Path, default=LLAMA_BIN)
    ap.add_argument("--workdir", type=Path, help="keep the models and base files here")
    ap.add_argument("--record", action="store_true", help="write tests/data/conformance/")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.llama_bin / "llama-perplexity").exists():
        print(f"no llama-perplexity in {args.llama_bin} (../shared/tools/build-llamacpp.sh)")
        return 2
    archs = sorted(ARCHITECTURES) if args.all else args.arch
    if args.record and (args.vocab or args.gguf):
        print("--record is for the synthetic models with the default tokenizer")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for arch in archs:
            rows.append(run_one(arch, synthetic(arch, work, args.vocab), args, work))
            print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        for path in args.gguf:
            rows.append(run_one(path.stem, path, args, work))
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
