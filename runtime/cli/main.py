"""The `tandem` command: run, pull, create/list/show/cp/rm, serve, ps, stop, plan, bench, help.

The flags the model commands share have one spelling everywhere (flags.py): -c/--num-ctx,
-ngl/--num-gpu, -t/--threads, --gpu-memory SIZE, --kv-cache-type, -np/--parallel.

tandem run MODEL [PROMPT] [--verbose] [--temperature T] [--num-predict N] [--seed S] [--raw]
           [-c N] [--kv-cache-type f16|q8_0] [-ngl N] [--gpu-memory SIZE] [-t N] [-np N]
           [--num-batch N] [--nowordwrap] [--local]
tandem pull MODEL
tandem create NAME [-f Modelfile] [--quantize q4_0|q4_1|q8_0]; list; show; cp; rm
tandem serve [--host H] [--port P] [--model MODEL] [-c N] [-np N] [-ngl N] [-t N]
             [--gpu-memory SIZE] [--kv-cache-type T] [--models-dir DIR]... [--allow-pull]
             [--max-loaded-models N] [--max-queue N] [--max-body-size SIZE]
             [--api-key KEY] [--cors-origins O,O...] [--no-webui]
tandem ps [--host HOST:PORT]; tandem stop MODEL [--host HOST:PORT]
tandem plan MODEL [--gpu-memory SIZE] [-c N] [-np N] [-ngl N] [--kv-cache-type T]
           [--num-batch N] [--json]
tandem bench MODEL [-p N] [-n N] [-d DEPTH] [-t THREADS] [-ngl N] [-r REPETITIONS] [--json]
tandem perplexity MODEL -f TEXT [-c N] [--chunks N] [-t THREADS] [--json]
                  [--kl-divergence-base FILE] [--kl-divergence]
tandem help [COMMAND]; tandem --version
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from loaders.pull import KNOWN, pull, pullable
from modelfiles.parameters import OPTIONS, default
from quant.errors import InvalidParameterError, ServerUnreachableError, TandemError
from runtime.cli.flags import add_flag, add_flags, add_store_flags, apply_store_flags, cli_size
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
# the commands that find models by name (and so may find other tools' models)
STORE_FLAG_COMMANDS = ("run", "pull", "list", "show", "serve", "plan", "bench", "perplexity")
MODEL_FLAGS = ("num_ctx", "num_gpu", "threads", "gpu_memory", "kv_cache_type", "parallel")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tandem")
    except PackageNotFoundError:
        return "0.0.0"


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
    parser.add_argument("-v", "--version", action="version", version=f"tandem version {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    helper = sub.add_parser("help", help="help about a command")
    helper.add_argument("topic", nargs="?", help="a command")
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
    run.add_argument(
        "--nowordwrap", action="store_true", help="print answers as they come, unwrapped"
    )
    run.add_argument(
        "--local",
        action="store_true",
        help="load the model in this process even when a `tandem serve` answers",
    )
    run.add_argument("--host", help="the server to use (default TANDEM_HOST or 127.0.0.1:11435)")
    add_flags(run, *MODEL_FLAGS[:-1])  # each over the Modelfile's PARAMETER of the same name
    add_flag(run, "parallel", shown_default=1)
    option_flag(run, "num_batch")
    option_flag(run, "num_cpu_moe", "--n-cpu-moe")
    pull_cmd = sub.add_parser(
        "pull",
        help="fetch a model: a catalog name, hf.co/USER/REPO[:QUANT] from Hugging Face, or "
        "[HOST/][NS/]NAME[:TAG] from an ollama registry",
    )
    pull_cmd.add_argument("model")
    stop = sub.add_parser("stop", help="unload a model a running server holds")
    stop.add_argument("model")
    stop.add_argument(
        "--host", help="the server's host:port (default TANDEM_HOST or 127.0.0.1:11435)"
    )
    add_server_commands(sub)
    add_store_commands(sub)
    add_plan_command(sub)
    add_bench_command(sub)
    add_perplexity_command(sub)
    for parser_of in {
        id(p): p for n, p in sub.choices.items() if n in STORE_FLAG_COMMANDS
    }.values():
        add_store_flags(parser_of)
    return parser


_CHOICES = {"kv_cache_type": {"choices": ("f16", "q8_0")}}


def add_plan_command(sub) -> None:
    plan = sub.add_parser("plan", help="show where a model's layers would run and how fast")
    plan.add_argument(
        "model",
        help="a stored or pullable name, or a .gguf path (a Modelfile's "
        "num_ctx, num_gpu, gpu_memory and cpu pins are defaults)",
    )
    add_flag(plan, "gpu_memory", help="VRAM to use (without a GPU: plan for one of this size)")
    add_flags(plan, "num_ctx", "num_gpu", "kv_cache_type")
    add_flag(plan, "parallel", default=1, shown_default=1)
    option_flag(plan, "num_cpu_moe", "--n-cpu-moe")
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
    add_flag(bench, "threads", help="CPU threads", shown_default="torch's")
    bench.add_argument("-r", "--repetitions", type=int, default=5, help="runs of each test")
    add_flag(
        bench,
        "num_gpu",
        help="layers on the GPU (0: none, -1: the planner's choice)",
        shown_default="as `tandem run` places the model",
    )
    bench.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from runtime.cli.bench import BenchSpec, format_table, run_bench

    spec = BenchSpec(
        args.model,
        args.n_prompt,
        args.n_gen,
        args.num_thread,
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
    add_flag(serve, "num_ctx", help="context per sequence when a Modelfile sets none")
    add_flag(
        serve,
        "parallel",
        help="sequences decoded together",
        shown_default=default("max_num_seqs"),
    )
    add_flags(serve, "num_gpu", "threads", "gpu_memory", "kv_cache_type")
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
    serve.add_argument("--no-webui", action="store_true", help="no chat page at / (the APIs only)")
    serve.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every request but /health "
        "(default TANDEM_API_KEY; none)",
    )
    serve.add_argument(
        "--cors-origins",
        default="",
        help="comma-separated browser origins allowed beyond the localhost ones "
        "('*' wildcards; also TANDEM_ORIGINS)",
    )
    ray = serve.add_argument_group("Ray Serve (pip install 'tandem[ray]'; docs/ray.md)")
    ray.add_argument("--ray", action="store_true", help="serve replicas on RAY_ADDRESS's cluster")
    ray.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    ray.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale replicas in MIN..MAX")
    ray.add_argument(
        "--router",
        choices=("prefix", "round-robin"),
        default="prefix",
        help="replica choice: prompt-prefix affinity (default) or round-robin",
    )
    ps = sub.add_parser("ps", help="list the models a running server holds")
    ps.add_argument(
        "--host", help="the server's host:port (default TANDEM_HOST or 127.0.0.1:11435)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from modelfiles.store import Store
    from runtime.server.address import server_address
    from runtime.server.app import serve
    from runtime.server.keep_alive import parse_keep_alive
    from runtime.server.models import RegistryOptions

    host, port = server_address(args.host, args.port)
    for folder in args.models_dir:
        if not Path(folder).expanduser().is_dir():
            raise InvalidParameterError(f"--models-dir {folder}: no such directory")
    max_body = cli_size(args.max_body_size, "--max-body-size", unit="MB")
    flags = {  # unset flags keep the option table's defaults
        "num_ctx": args.num_ctx,
        "max_num_seqs": args.parallel,
        "kv_cache_type": args.kv_cache_type,
    }
    load = {
        "num_gpu": args.num_gpu,
        "num_thread": args.num_thread,
        "gpu_memory": cli_size(args.gpu_memory, "--gpu-memory"),
    }
    options = RegistryOptions(
        max_waiting=args.max_queue,
        max_loaded=args.max_loaded_models,
        models_dirs=tuple(args.models_dir),
        allow_pull=args.allow_pull,
        keep_alive=parse_keep_alive(args.keep_alive),
        load=tuple((k, v) for k, v in load.items() if v is not None),
        **{k: v for k, v in flags.items() if v is not None},
    )
    options.settings()  # validate before the server starts
    Store()  # opening the store removes what killed creates and pulls left behind
    logging.getLogger("runtime.server").setLevel(logging.INFO)
    logging.getLogger("runtime.engine.llm_engine").setLevel(logging.INFO)  # the KV cache size
    if args.no_webui:
        from runtime.server import webui

        webui.enabled = False
    if args.model:
        watch_preload(host, port)
    origins = tuple(o.strip() for o in args.cors_origins.split(",") if o.strip())
    if args.ray:
        return serve_on_ray(args, host, port, options, origins)
    serve(host, port, args.model, options, max_body=max_body, api_key=args.api_key, origins=origins)
    return 0


def serve_on_ray(args, host: str, port: int, options, origins: tuple[str, ...]) -> int:
    """`tandem serve --ray`: tandem's server as Ray Serve replicas (runtime/server/ray_app.py)."""
    from runtime.server.guard import GuardOptions
    from runtime.server.ray_app import RayOptions, parse_autoscale, run_on_ray

    if not args.model:
        raise InvalidParameterError("--ray needs --model: each replica preloads it")
    threads = args.num_thread or 1
    run_on_ray(
        RayOptions(
            model=args.model,
            replicas=args.replicas,
            autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
            threads=threads,
            router=args.router,
            registry=dataclasses.replace(
                options,
                load=options.load if args.num_thread else (*options.load, ("num_thread", 1)),
            ),
            guard=GuardOptions(bind_host=host, origins=origins, api_key=args.api_key),
        ),
        host,
        port,
    )
    return 0


def watch_preload(host: str, port: int) -> None:
    """Watch /health until the --model is loaded; if its load failed, end the process with
    status 1 (the error is logged) instead of answering 503 forever."""
    import json
    import urllib.error
    import urllib.request

    from runtime.server.address import base_url

    local = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    url = f"{base_url(local, port)}/health"

    def watch() -> None:
        while True:
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return  # loaded
            except urllib.error.HTTPError as err:
                try:
                    status = json.loads(err.read()).get("status")
                except ValueError:
                    status = None
                if status == "error":  # the error is logged; nothing else is loaded
                    print("Error: the --model could not load; stopping", file=sys.stderr)
                    sys.stderr.flush()
                    sys.stdout.flush()
                    os._exit(1)
            except OSError:
                continue  # not listening yet

    threading.Thread(target=watch, name="tandem-preload-watch", daemon=True).start()


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
        flags["gpu_memory"] = cli_size(flags["gpu_memory"], "--gpu-memory")
    # one conversation by default: a KV pool of one context
    return {"num_parallel": args.parallel or 1, **flags}


def cmd_run(args: argparse.Namespace) -> int:
    from runtime.cli.feedback import cuda_warning, quiet_environment, spinner, startup_line
    from runtime.cli.repl import Repl
    from runtime.run_options import RunOptions

    flags = run_flags(args)
    options = RunOptions.resolve(flags=flags)  # the flags are valid before the (slow) load
    backend = None if args.local or _load_flags(args) else _server_backend(args)
    if backend is None:
        from modelfiles.resolver import resolve
        from runtime.cli.chat_backend import Local
        from runtime.llm import LLM

        warning = cuda_warning()
        if warning:
            print(warning, file=sys.stderr)
        spec = resolve(args.model)  # the one resolution of the reference (may pull)
        if spec.source and not quiet_environment():  # another tool's file: say which
            print(f"{spec.name}: {spec.source}'s file {spec.path}, used in place", file=sys.stderr)
        with spinner(f"loading {spec.name}"):
            llm = LLM(spec, options=RunOptions.resolve(spec.parameters, flags))
        if not quiet_environment():
            print(startup_line(llm), file=sys.stderr)
        backend = Local(llm)
        params = llm.options.sampling
    else:
        params = options.sampling
    repl = Repl(
        None,
        params,
        raw=args.raw,
        verbose=args.verbose,
        wordwrap=not args.nowordwrap,
        backend=backend,
    )
    if backend.__class__.__name__ == "Remote":  # the flags' sampling options go with each request
        repl.options = {
            k: v for k, v in flags.items() if k in ("temperature", "num_predict", "seed")
        }
    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt:
        repl.answer(prompt)
        return 0
    return repl.loop()


def _load_flags(args: argparse.Namespace) -> bool:
    """Flags that decide how the model loads: a server has loaded it its own way, so these
    run the model here."""
    names = ("num_ctx", "num_gpu", "num_thread", "gpu_memory", "kv_cache_type", "num_batch")
    return any(getattr(args, n) is not None for n in names) or args.parallel is not None


def _server_backend(args: argparse.Namespace):
    """A running `tandem serve` (or ollama) at --host / TANDEM_HOST, as ollama's client uses
    it; None when none answers (then the model loads here)."""
    from runtime.cli.chat_backend import Remote, server_answers
    from runtime.cli.feedback import spinner
    from runtime.server.address import base_url, parse_address, server_address

    host, port = parse_address(args.host) if args.host else server_address()
    url = base_url(host, port)
    if not server_answers(url):
        if args.host:
            raise ServerUnreachableError(f"no server answered at {url}; drop --host to run here")
        return None
    backend = Remote(url, args.model)
    with spinner(f"loading {args.model} on {url}"):
        backend.load()
    print(
        f"{args.model}: answered by the server at {url} (--local to load it here)", file=sys.stderr
    )
    return backend


def cmd_pull(args: argparse.Namespace) -> int:
    from loaders.hf_pull import is_hf_ref
    from modelfiles.builder import ensure_builtin
    from modelfiles.names import ModelName
    from modelfiles.store import Store

    local = _kept_elsewhere(args.model)
    if local is not None:  # `tandem run` uses it where it is: a copy would waste the disk
        print(f"{local.name}: {local.source}'s file {local.path}, used in place (nothing pulled)")
        return 0
    if is_hf_ref(args.model):
        from modelfiles.hf_models import ensure_hf

        name, manifest = ensure_hf(Store(), args.model, refresh=True)
        print(f"success: {name} ({manifest.model.digest[:19]}, {manifest.model.size / 1e6:.1f} MB)")
        return 0
    from modelfiles.registry_models import ensure_registry, from_registry

    if from_registry(args.model):
        name, manifest = ensure_registry(Store(), args.model, refresh=True)
        print(f"success: {name} ({manifest.model.digest[:19]}, {manifest.model.size / 1e6:.1f} MB)")
        return 0
    entry = pullable(args.model)
    path = pull(entry.name)
    ensure_builtin(Store(), ModelName.parse(entry.name))  # `tandem list` shows it from now on
    print(f"{entry.name}: {entry.description}\n{path}")
    return 0


def _kept_elsewhere(text: str):
    """The model another tool keeps under the name `text` (modelfiles/local_stores.py), when
    tandem's store does not hold it and it is not a catalog name (those are pulled as asked)."""
    from loaders.hf_pull import is_hf_ref
    from modelfiles.hf_models import stored_name
    from modelfiles.local_stores import find
    from modelfiles.names import ModelName
    from modelfiles.store import Store

    if is_hf_ref(text):
        name = stored_name(text)
    else:
        name = ModelName.maybe(text)
        if name is not None and (str(name).removesuffix(":latest") in KNOWN or str(name) in KNOWN):
            return None
        if name is not None and "/" in name.name:  # `library/x` is stored as `x`
            from modelfiles.registry_models import stored_name as registry_name

            name = registry_name(text)
    if name is not None and Store().get(name) is not None:
        return None
    return find(text)


def cmd_stop(args: argparse.Namespace) -> int:
    from runtime.cli.ps import stop_model
    from runtime.server.address import base_url, parse_address, server_address

    host, port = parse_address(args.host) if args.host else server_address()
    stop_model(base_url(host, port), args.model)
    return 0


def cmd_help(parser: argparse.ArgumentParser, topic: str | None) -> int:
    """`tandem help [COMMAND]`: the command's --help, or the list of commands."""
    if topic is None:
        parser.print_help()
        return 0
    try:
        parser.parse_args([topic, "--help"])
    except SystemExit as exit:
        return int(exit.code or 0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "help":
        return cmd_help(parser, args.topic)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("kernels.native_loader").setLevel(logging.INFO)  # the one-time build
    try:
        apply_store_flags(args)  # a bad --local-stores is refused before any work
        commands = {
            "run": cmd_run,
            "pull": cmd_pull,
            "serve": cmd_serve,
            "ps": cmd_ps,
            "stop": cmd_stop,
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
