"""Models other tools keep on this machine, used where they are: the GGUF is memory-mapped
from the other tool's folder, never copied or linked into tandem's store, and nothing is
written there (modelfiles/ollama_store.py, modelfiles/gguf_folders.py read them).

Where tandem looks for a model name, in order, after its own store (TANDEM_HOME/models):

    ollama       TANDEM_OLLAMA_MODELS, else OLLAMA_MODELS, else ~/.ollama/models
    huggingface  TANDEM_HF_CACHE, else HF_HUB_CACHE, else $HF_HOME/hub, else
                 $XDG_CACHE_HOME/huggingface/hub (~/.cache/huggingface/hub)
    lmstudio     TANDEM_LMSTUDIO_MODELS, else ~/.lmstudio/models, then ~/.cache/lm-studio/models

A TANDEM_* folder variable set to `off` turns that source off; TANDEM_LOCAL_STORES lists the
sources to use (default `ollama,huggingface,lmstudio`; `off` for none). The flags
--local-stores, --ollama-models, --hf-cache and --lmstudio-models set them for one command.
"""

from __future__ import annotations

import os
from pathlib import Path

from loaders.hf_pull import is_hf_ref, parse_ref
from modelfiles import ollama_store
from modelfiles.gguf_folders import hf_find, hf_models, lms_find, lms_models
from modelfiles.local_model import HUGGINGFACE, LMSTUDIO, OLLAMA, SOURCES, LocalModel, split_name
from quant.errors import InvalidParameterError

ENABLED = "TANDEM_LOCAL_STORES"
FOLDER_ENV = {
    OLLAMA: "TANDEM_OLLAMA_MODELS",
    HUGGINGFACE: "TANDEM_HF_CACHE",
    LMSTUDIO: "TANDEM_LMSTUDIO_MODELS",
}
OFF = ("off", "none")


def enabled() -> tuple[str, ...]:
    """The sources TANDEM_LOCAL_STORES turns on, in lookup order."""
    text = os.environ.get(ENABLED, "").strip().lower()
    if not text:
        return SOURCES
    if text in OFF:
        return ()
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(SOURCES)
    if unknown:
        raise InvalidParameterError(
            f"{ENABLED}={text}: {', '.join(sorted(unknown))} is not a source; "
            f"use a list of {', '.join(SOURCES)}, or off"
        )
    return tuple(s for s in SOURCES if s in names)


def folders(source: str) -> list[Path]:
    """Where `source` keeps its models (none when it is turned off)."""
    if source not in enabled():
        return []
    own = os.environ.get(FOLDER_ENV[source], "").strip()
    if own.lower() in OFF:
        return []
    return [Path(own).expanduser()] if own else _defaults(source)


def _defaults(source: str) -> list[Path]:
    env, home = os.environ.get, Path.home()
    if source == OLLAMA:
        return [Path(env("OLLAMA_MODELS") or home / ".ollama" / "models").expanduser()]
    if source == HUGGINGFACE:
        if env("HF_HUB_CACHE"):
            return [Path(env("HF_HUB_CACHE") or "").expanduser()]
        cache = Path(env("XDG_CACHE_HOME") or home / ".cache")
        return [Path(env("HF_HOME") or cache / "huggingface").expanduser() / "hub"]
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def find(text: str) -> LocalModel | None:
    """The first model named `text` in the sources, in order; None when none has it."""
    for source in enabled():
        for folder in folders(source):
            model = _find_in(source, folder, text)
            if model is not None:
                return model
    return None


def _find_in(source: str, folder: Path, text: str) -> LocalModel | None:
    if is_hf_ref(text):
        ref = parse_ref(text)
        if source == OLLAMA:  # ollama names what it pulled from the hub hf.co/user/repo:tag
            return ollama_store.find(folder, f"hf.co/{ref.repo}:{ref.quant or 'latest'}")
        finder = hf_find if source == HUGGINGFACE else lms_find
        return finder(folder, ref.repo, ref.quant)
    if source == OLLAMA:
        return ollama_store.find(folder, text)
    name, tag = split_name(text)
    if source == LMSTUDIO and name.count("/") == 1:
        return lms_find(folder, name, tag)
    return None


def models() -> list[LocalModel]:
    """Every model the sources hold, in lookup order; a name found twice is listed once (the
    copy a lookup would find)."""
    listers = {OLLAMA: ollama_store.models, HUGGINGFACE: hf_models, LMSTUDIO: lms_models}
    out: dict[str, LocalModel] = {}
    for source in enabled():
        for folder in folders(source):
            for model in listers[source](folder):
                out.setdefault(model.name, model)
    return list(out.values())
