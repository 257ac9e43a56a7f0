"""ollama's model store, read in place (modelfiles/local_stores.py says where it is):

    manifests/<host>/<namespace>/<name>/<tag>     a JSON manifest (Docker's v2 schema) whose
                                                  layers name blobs by digest
    blobs/sha256-<hex>                            the layers' bytes

`registry.ollama.ai/library/llama3.2/latest` is the model `llama3.2:latest`; another namespace
is `namespace/name:tag`, another host `host/namespace/name:tag` (ollama's own short forms, so
`hf.co/user/repo:q4_k_m` pulled by ollama is found under the name tandem gives it too).

The layer of media type application/vnd.ollama.image.model is the GGUF, mapped where it is;
the template, system, params (JSON), messages (JSON), license and adapter layers set what a
Modelfile would. A parameter tandem does not take is skipped with a warning; a projector
(vision) layer is not used. Nothing here writes: a damaged manifest or a missing blob is
reported with ollama's command that repairs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from modelfiles.local_model import OLLAMA, LocalModel, Settings, split_name
from modelfiles.parameters import PARAMETERS, format_value, parse_value
from quant.errors import ModelNotFoundError

log = logging.getLogger(__name__)

MEDIA = "application/vnd.ollama.image."
MODEL = MEDIA + "model"
HOST, NAMESPACE = "registry.ollama.ai", "library"
_PART = re.compile(r"[a-z0-9_][a-z0-9_.:-]{0,200}")
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
_MAX_MANIFEST = 1 << 20
_MAX_TEXT = 8 << 20


def find(root: Path, text: str) -> LocalModel | None:
    """The model `text` names in the store at `root`, None when it holds no such manifest;
    ModelNotFoundError when the manifest is damaged or its GGUF blob is missing."""
    name, tag = split_name(text)
    parts = name.split("/")
    full = {1: [HOST, NAMESPACE], 2: [HOST], 3: []}.get(len(parts))
    if full is None:
        return None
    path = _find_folded(root / "manifests", [*full, *parts, tag or "latest"])
    return None if path is None else read(root, path)


def models(root: Path) -> list[LocalModel]:
    """Every model in the store (damaged manifests are logged and left out)."""
    out = []
    for path in sorted((root / "manifests").glob("*/*/*/*")):
        if not path.is_file():
            continue
        try:
            out.append(read(root, path))
        except ModelNotFoundError as err:
            log.warning("%s", err)
    return out


def read(root: Path, path: Path) -> LocalModel:
    """The model of the manifest at `path` (under root/manifests)."""
    name = short_name(*path.relative_to(root / "manifests").parts)
    raw = _read(path, _MAX_MANIFEST, name)
    layers = _layers(raw, name)
    blobs = [(media, _blob(root, digest, size, name)) for media, digest, size in layers]
    gguf = [p for media, p in blobs if media == MODEL]
    if len(gguf) != 1:
        raise _damaged(name, path, f"it has {len(gguf)} model layers, not 1")
    adapters = sum(size for media, _, size in layers if media == MEDIA + "adapter")
    return LocalModel(
        name=name,
        source=OLLAMA,
        path=gguf[0],
        size=gguf[0].stat().st_size + adapters,
        mtime=path.stat().st_mtime,
        id=hashlib.sha256(raw).hexdigest()[:12],
        layers=tuple((media, p) for media, p in blobs if media != MODEL),
    )


def short_name(host: str, namespace: str, model: str, tag: str) -> str:
    """ollama's short form of a manifest's name (the default host and namespace left out)."""
    if host != HOST:
        prefix = f"{host}/{namespace}/"
    else:
        prefix = "" if namespace == NAMESPACE else f"{namespace}/"
    return f"{prefix}{model}:{tag}".lower()


def settings(model: LocalModel) -> Settings:
    """What the model's template, system, params, messages, license and adapter layers set."""
    return layer_settings(model.layers, model.name)


def layer_settings(layers: Iterable[tuple[str, Path]], name: str) -> Settings:
    """What ollama layers (media type, file) other than the model's set (also for a model
    pulled from a registry: modelfiles/registry_models.py)."""
    out = Settings()
    for media, blob in layers:
        kind = media.removeprefix(MEDIA)
        if kind == "adapter":
            out.adapters.append(blob)
        elif kind in ("template", "prompt"):
            out.template = _text(blob, name)
        elif kind == "system":
            out.system = _text(blob, name)
        elif kind == "license":
            out.license.append(_text(blob, name))
        elif kind == "params":
            out.parameters = parameters(_json(blob, name), name)
        elif kind == "messages":
            out.messages = _messages(_json(blob, name), name)
        elif kind == "projector":
            log.warning("%s: its vision projector is not used (tandem runs text)", name)
    return out


def parameters(data: Any, name: str) -> dict[str, Any]:
    """ollama's params layer as tandem's typed parameters; what tandem does not take is
    skipped with a warning (the model still runs)."""
    if not isinstance(data, dict):
        raise _damaged(name, None, "its params layer is not a JSON object")
    out: dict[str, Any] = {}
    for key, value in data.items():
        option = PARAMETERS.get(key)
        values = value if isinstance(value, list) else [value]
        try:
            if option is None:
                raise ValueError("tandem has no such parameter")
            typed = [parse_value(key, v if isinstance(v, str) else format_value(v)) for v in values]
        except (ValueError, KeyError) as err:
            log.warning("%s: ollama's parameter %s is not used: %s", name, key, err)
            continue
        if typed:
            out[key] = typed if option.repeated else typed[-1]
    return out


def _find_folded(base: Path, parts: list[str]) -> Path | None:
    """base/parts... matched case-insensitively (ollama keeps a name as it was typed)."""
    path = base
    for part in parts:
        if not _PART.fullmatch(part) or ".." in part:
            return None
        if not (path / part).exists():
            folded = [c for c in _children(path) if c.name.lower() == part]
            part = folded[0].name if folded else part
        path = path / part
    return path if path.is_file() else None


def _children(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _layers(raw: bytes, name: str) -> list[tuple[str, str, int]]:
    try:
        return manifest_layers(raw)
    except ValueError as err:
        raise _damaged(name, None, f"it is not an ollama manifest ({err})") from None


def manifest_layers(raw: bytes) -> list[tuple[str, str, int]]:
    """An ollama manifest's layers as (media type, digest, size); ValueError when `raw` is
    not one."""
    try:
        layers = json.loads(raw)["layers"]
        return [(str(x["mediaType"]), str(x["digest"]), int(x["size"])) for x in layers]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from None


def _blob(root: Path, digest: str, size: int, name: str) -> Path:
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise _damaged(name, None, f"a layer's digest {digest[:80]!r} is not sha256:<hex>")
    for path in (root / "blobs" / f"sha256-{match[1]}", root / "blobs" / f"sha256:{match[1]}"):
        if path.is_file():
            if path.stat().st_size != size:
                raise _damaged(name, path, f"the blob is {path.stat().st_size} bytes, not {size}")
            return path
    raise _damaged(name, root / "blobs", f"the blob sha256-{match[1]} is missing")


def _read(path: Path, limit: int, name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise _damaged(name, path, f"it cannot be read: {err.strerror}") from None
    if len(data) > limit:
        raise _damaged(name, path, f"it is larger than {limit} bytes")
    return data


def _text(blob: Path, name: str) -> str:
    return _read(blob, _MAX_TEXT, name).decode("utf-8", "replace")


def _json(blob: Path, name: str) -> Any:
    try:
        return json.loads(_read(blob, _MAX_TEXT, name))
    except ValueError as err:
        raise _damaged(name, blob, f"a layer is not JSON ({err})") from None


def _messages(data: Any, name: str) -> list[dict[str, str]]:
    ok = isinstance(data, list) and all(
        isinstance(m, dict) and all(isinstance(v, str) for v in m.values()) for m in data
    )
    if not ok:
        raise _damaged(name, None, "its messages layer is not a list of {role, content}")
    return [{"role": m.get("role", ""), "content": m.get("content", "")} for m in data]


def _damaged(name: str, path: Path | None, why: str) -> ModelNotFoundError:
    where = f" ({path})" if path is not None else ""
    return ModelNotFoundError(
        f"ollama's model {name!r}{where} cannot be used: {why}. tandem does not change "
        f"ollama's files: `ollama pull {name}` repairs it (or turn this store off with "
        "TANDEM_OLLAMA_MODELS=off)"
    )
