"""`tandem perplexity`: llama-perplexity's perplexity and KL-divergence modes on tandem.

    tandem perplexity MODEL -f TEXT [-c 512] [--chunks N] [--json]
    tandem perplexity MODEL -f TEXT --kl-divergence-base base.kl     # also save log-probs
    tandem perplexity MODEL --kl-divergence-base base.kl --kl-divergence  # compare to them

The base file may come from llama-perplexity (`--kl-divergence-base FILE` without
`--kl-divergence`) or from tandem; runtime/perplexity.py holds the method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quant.errors import InvalidParameterError


def add_perplexity_command(sub) -> None:
    ppl = sub.add_parser(
        "perplexity", help="perplexity of a text, or KL divergence against saved logits"
    )
    ppl.add_argument("model", help="a pullable name, a stored model or a .gguf path")
    ppl.add_argument("-f", "--file", type=Path, help="the text to evaluate")
    ppl.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (512)")
    ppl.add_argument("--chunks", type=int, help="evaluate at most this many chunks")
    ppl.add_argument("-t", "--threads", type=int, help="CPU threads (default: tandem run's)")
    ppl.add_argument(
        "--kl-divergence-base",
        type=Path,
        metavar="FILE",
        help="without --kl-divergence: write the log-probabilities here (llama.cpp's format); "
        "with it: the base to compare against",
    )
    ppl.add_argument(
        "--kl-divergence",
        action="store_true",
        help="compare against --kl-divergence-base (its tokens; -f is not needed)",
    )
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_perplexity(args: argparse.Namespace) -> int:
    from loaders.kl_base import KLBase
    from runtime.loaded_model import LoadedModel
    from runtime.perplexity import kl_divergence, perplexity
    from runtime.run_options import RunOptions

    if args.kl_divergence and args.kl_divergence_base is None:
        raise InvalidParameterError("--kl-divergence needs --kl-divergence-base FILE")
    if not args.kl_divergence and args.file is None:
        raise InvalidParameterError("give the text to evaluate with -f FILE")
    base = KLBase.read(args.kl_divergence_base) if args.kl_divergence else None
    text = None if args.kl_divergence else _read_text(args.file)
    flags = {"num_thread": args.threads} if args.threads else {}
    lm = LoadedModel.load(args.model, options=RunOptions.resolve(flags=flags))
    if base is not None:
        summary = kl_divergence(lm, base, args.chunks)
        print(json.dumps(summary) if args.json else format_kl(summary))
        return 0
    assert text is not None
    result = perplexity(lm, text, args.ctx_size, args.chunks, args.kl_divergence_base)
    print(json.dumps(result.to_dict()) if args.json else format_perplexity(result))
    return 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidParameterError(f"-f {path}: cannot read it as UTF-8 text ({err})") from err


def format_perplexity(result) -> str:
    """llama-perplexity's lines: the running PPL per chunk, then the final estimate."""
    running = ",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(result.running))
    return (
        f"{running}\nFinal estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}\n"
        f"({result.n_chunks} chunks of {result.n_ctx} tokens; mean top-token probability "
        f"{result.mean_top_p:.3f})"
    )


def format_kl(s: dict) -> str:
    """llama-perplexity's KL-divergence statistics block."""
    pm = lambda v, k=6: f"{v[0]:10.{k}f} ± {v[1]:10.{k}f}"  # noqa: E731
    return "\n".join(
        [
            f"====== Perplexity statistics ({s['count']} positions) ======",
            f"Mean PPL(Q)                   : {pm(s['ppl'])}",
            f"Mean PPL(base)                : {pm(s['ppl_base'])}",
            f"Mean ln(PPL(Q)/PPL(base))     : {pm(s['ln_ppl_ratio'])}",
            f"Mean PPL(Q)/PPL(base)         : {pm(s['ppl_ratio'])}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {pm(s['kld'])}",
            f"Maximum KLD: {s['kld_max']:10.6f}",
            f"99.0%   KLD: {s['kld_99']:10.6f}",
            f"Median  KLD: {s['kld_median']:10.6f}",
            "",
            "====== Token probability statistics ======",
            f"RMS Δp    : {100 * s['rms_dp'][0]:6.3f} ± {100 * s['rms_dp'][1]:5.3f} %",
            f"Same top p: {100 * s['same_top'][0]:6.3f} ± {100 * s['same_top'][1]:5.3f} %",
            f"(base mean top-token probability {s['base_mean_top_p']:.3f})",
        ]
    )
