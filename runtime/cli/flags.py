"""One vocabulary for the flags `run`, `serve`, `plan` and `bench` share: the same name, the
same short form and the same meaning on every command.

    --num-ctx, -c          context per sequence (tokens)
    --num-gpu, -ngl        layers on the GPU (-1: the planner's choice, 0: none)
    --threads, -t          CPU threads
    --gpu-memory SIZE      the most GPU memory the model may take (a unit is required: 4GB)
    --kv-cache-type T      f16 or q8_0
    --parallel, -np        sequences at once

Older spellings (--kv-type, --num-thread, --num-parallel) are accepted, hidden from --help.
Sizes given on the command line need a unit: `4` is refused with a message naming `4GB`.
"""

from __future__ import annotations

import argparse
import os
import re

from modelfiles.local_model import HUGGINGFACE, LMSTUDIO, OLLAMA
from modelfiles.local_stores import ENABLED, FOLDER_ENV, enabled
from modelfiles.parameters import OPTIONS
from quant.errors import InvalidParameterError

# name → (flags shown, hidden aliases, dest, type)
FLAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, type]] = {
    "num_ctx": (("--num-ctx", "-c"), (), "num_ctx", int),
    "num_gpu": (("--num-gpu", "-ngl"), (), "num_gpu", int),
    "threads": (("--threads", "-t"), ("--num-thread",), "num_thread", int),
    "gpu_memory": (("--gpu-memory",), (), "gpu_memory", str),
    "kv_cache_type": (("--kv-cache-type",), ("--kv-type",), "kv_cache_type", str),
    "parallel": (("--parallel", "-np"), ("--num-parallel",), "parallel", int),
}
_OPTION = {"threads": "num_thread", "parallel": "num_parallel"}  # the option table's name
_UNIT = re.compile(r"\s*\d+(\.\d*)?\s*[A-Za-z]+\s*")


def add_flag(parser: argparse.ArgumentParser, name: str, help: str | None = None, **kw) -> None:
    """The shared flag `name` (a key of FLAGS) with its hidden aliases."""
    shown, hidden, dest, kind = FLAGS[name]
    option = OPTIONS[_OPTION.get(name, name)]
    text = help or option.meaning
    default = kw.pop("shown_default", option.default)
    if default is not None:
        text += f" (default {default})"
    if name == "kv_cache_type":
        kw.setdefault("choices", ("f16", "q8_0"))
    if name == "gpu_memory":
        kw.setdefault("metavar", "SIZE")
        text += "; e.g. 6GB, 6GiB, 512MiB"
    parser.add_argument(*shown, dest=dest, type=kind, help=text, **kw)
    for alias in hidden:
        parser.add_argument(alias, dest=dest, type=kind, help=argparse.SUPPRESS, **kw)


def add_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    for name in names:
        add_flag(parser, name)


def cli_size(text: str | None, flag: str, unit: str = "GB") -> int | None:
    """Bytes in a size given on the command line; a bare number is refused (it used to mean
    bytes, so `--gpu-memory 4` asked for 4 bytes)."""
    from runtime.placement.devices import parse_size

    if text is None:
        return None
    if not _UNIT.fullmatch(text):
        number = text.strip()
        number = number if re.fullmatch(r"\d+(\.\d*)?", number) else "6"
        binary = unit[0] + "i" + unit[1:]
        raise InvalidParameterError(
            f"{flag} {text}: a size needs a unit, e.g. {number}{unit} or {number}{binary}"
        )
    return parse_size(text)


# ---- other tools' model folders (modelfiles/local_stores.py) -------------------------------

# flag → (the variable it sets for this command, metavar, help)
STORE_FLAGS: dict[str, tuple[str, str, str]] = {
    "--local-stores": (
        ENABLED,
        "LIST",
        "other tools' models to use in place: a list of ollama, huggingface, lmstudio, or off "
        f"(default all; {ENABLED})",
    ),
    "--ollama-models": (
        FOLDER_ENV[OLLAMA],
        "DIR",
        "ollama's models folder, or off (default OLLAMA_MODELS or ~/.ollama/models)",
    ),
    "--hf-cache": (
        FOLDER_ENV[HUGGINGFACE],
        "DIR",
        "the Hugging Face hub cache, or off (default HF_HUB_CACHE, $HF_HOME/hub or "
        "~/.cache/huggingface/hub)",
    ),
    "--lmstudio-models": (
        FOLDER_ENV[LMSTUDIO],
        "DIR",
        "LM Studio's models folder, or off (default ~/.lmstudio/models, ~/.cache/lm-studio/models)",
    ),
}


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say where other tools keep models (each sets its variable)."""
    group = parser.add_argument_group("models other tools keep (used in place, never copied)")
    for flag, (_, metavar, text) in STORE_FLAGS.items():
        group.add_argument(flag, dest=_dest(flag), metavar=metavar, help=text)


def apply_store_flags(args: argparse.Namespace) -> None:
    """Set the variables the store flags given stand for, for this process (and a server's
    requests)."""
    for flag, (variable, _, _) in STORE_FLAGS.items():
        value = getattr(args, _dest(flag), None)
        if value is not None:
            os.environ[variable] = value
    enabled()  # InvalidParameterError for a source tandem does not know


def _dest(flag: str) -> str:
    return "store_" + flag.removeprefix("--").replace("-", "_")
