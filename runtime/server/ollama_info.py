"""What ollama's model endpoints say about a model: details (family, size, quantization),
/api/tags entries, /api/show, /api/ps entries — read from the model store, the GGUF header
and the served model."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import math
import time
from pathlib import Path

import gguf

from loaders.chat_template import builtin_template
from loaders.gguf_file import GGUFFile
from modelfiles import local_stores
from modelfiles.names import ModelName
from modelfiles.resolver import ModelSpec
from modelfiles.store import Store
from quant.errors import TandemError
from runtime.server.models import ServedModel

log = logging.getLogger(__name__)
FOREVER = "9999-12-31T23:59:59Z"  # expires_at of a model kept loaded without limit


def iso(t: float) -> str:
    """A unix time as RFC 3339 in UTC, as ollama writes it."""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(time.time())


def digest(path: Path) -> str:
    """The sha256 of a blob named sha256-<hex>; otherwise the file's name (not hashed)."""
    return path.name.removeprefix("sha256-") if path.name.startswith("sha256-") else path.name


def model_digest(name: str, path: Path) -> str:
    """One id per model everywhere: a stored model's manifest sha256 (whose start is the ID
    `tandem list` shows), else the file's digest() (a model named by its path)."""
    parsed = ModelName.maybe(name)
    try:
        manifest = Store().get(parsed) if parsed is not None else None
    except TandemError:
        manifest = None
    if manifest is None:
        return digest(path)
    return hashlib.sha256(manifest.to_json().encode()).hexdigest()


def _parameter_size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}" if n < 10 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def _quantization(md: dict) -> str:
    ftype = md.get("general.file_type")
    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_")
    except ValueError:
        return "unknown"


def details(file: GGUFFile) -> dict:
    md = file.metadata
    arch = str(md.get("general.architecture", "unknown"))
    n_params = sum(t.n_elements for t in file.tensors.values())
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch],
        "parameter_size": _parameter_size(n_params),
        "quantization_level": _quantization(md),
    }


@functools.lru_cache(maxsize=64)
def file_details(path: Path) -> dict:
    """details() of a GGUF file, read once per path (store blobs never change)."""
    with GGUFFile(path) as file:
        return details(file)


def tags_entry(name: str, path: Path, size: int, modified: float) -> dict:
    return {
        "name": name,
        "model": name,
        "modified_at": iso(modified),
        "size": size,
        "digest": model_digest(name, path),
        "details": file_details(path),
    }


def local_models(loaded: list[ServedModel]) -> list[dict]:
    """/api/tags: every stored model, then loaded ones the store does not hold (paths)."""
    store = Store()
    out = []
    for name, m in store.list():  # damaged manifests are left out (and logged) by the store
        try:
            mtime = store.manifest_path(name).stat().st_mtime
            out.append(tags_entry(str(name), store.blob_path(m.model), m.model.size, mtime))
        except (TandemError, OSError) as err:  # its blob is gone or unreadable
            log.warning("/api/tags: skipping %s: %s", name, err)
    seen = {e["name"] for e in out}
    for local in local_stores.models():  # other tools' models, used in place
        if local.name not in seen:
            seen.add(local.name)
            try:
                out.append(tags_entry(local.name, local.path, local.size, local.mtime))
            except (TandemError, OSError) as err:
                log.warning("/api/tags: skipping %s (%s): %s", local.name, local.source, err)
    out += [
        tags_entry(m.name, m.lm.path, m.lm.gguf.file_size, m.lm.path.stat().st_mtime)
        for m in loaded
        if m.name not in seen
    ]
    return out


def ps_entry(served: ServedModel) -> dict:
    expires = FOREVER if math.isinf(served.keep_alive) else iso(served.expires_at)
    return {
        "name": served.name,
        "model": served.name,
        "size": served.size,
        "digest": model_digest(served.name, served.lm.path),
        "details": details(served.lm.gguf),
        "expires_at": expires,
        "size_vram": served.size_vram,
        "context_length": served.num_ctx,
    }


def _parameters_text(parameters: dict) -> str:
    lines = []
    for key, value in parameters.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key} {v}")
    return "\n".join(lines)


def show(spec: ModelSpec, file: GGUFFile) -> dict:
    """/api/show for a resolved model, without loading it."""
    md = file.metadata
    # scalars only: arrays (the vocabulary, merges: megabytes) are left out, as ollama does
    info = {k: v for k, v in md.items() if isinstance(v, (str, int, float, bool))}
    arch = str(md.get("general.architecture", ""))
    gguf_template = md.get("tokenizer.chat_template")
    template = (
        spec.template
        or (gguf_template if isinstance(gguf_template, str) else None)
        or builtin_template(arch)
    )
    modelfile = [f"# Modelfile generated by tandem\nFROM {spec.path}", f'TEMPLATE """{template}"""']
    if spec.system:
        modelfile.append(f'SYSTEM """{spec.system}"""')
    modelfile += [f"PARAMETER {line}" for line in _parameters_text(spec.parameters).splitlines()]
    modelfile += [f"MESSAGE {m['role']} {m['content']}" for m in spec.messages]
    out = {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": _parameters_text(spec.parameters),
        "template": template,
        "details": details(file),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": iso(spec.path.stat().st_mtime),
    }
    if spec.system:
        out["system"] = spec.system
    return out
