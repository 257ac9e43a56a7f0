"""Models from an ollama registry (`NAME[:TAG]`, `NS/NAME:TAG`, `HOST[:PORT]/NS/NAME:TAG`):
pulled once (loaders/ollama_pull.py), then registered in tandem's store under ollama's short
name (`llama3.2:latest`, `ns/name:tag`, `host:port/ns/name:tag`: ollama_store.short_name), so
`tandem run` and `tandem list` find them without the network afterwards.

The manifest's template, system, params, messages, license and adapter layers set what they
set for a model in ollama's own store (ollama_store.layer_settings reads both): they become the
stored model's Modelfile settings. Every layer is kept as a blob (a second pull downloads
nothing); a vision projector is not downloaded (tandem runs text), nor a layer of a kind tandem
does not know.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from loaders.ollama_pull import (
    HOST,
    RegistryRef,
    enabled,
    fetch_blob,
    fetch_manifest,
    parse_ref,
)
from loaders.pull import known_key
from modelfiles.builder import create_model
from modelfiles.manifest import Manifest
from modelfiles.modelfile import Modelfile
from modelfiles.names import ModelName
from modelfiles.ollama_store import MEDIA, MODEL, layer_settings, manifest_layers, short_name
from modelfiles.store import Store
from quant.errors import ModelNotFoundError, PullError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
USED = {MODEL, *(MEDIA + k for k in ("adapter", "template", "prompt", "system", "params"))}
USED |= {MEDIA + "license", MEDIA + "messages"}


def stored_name(text: str) -> ModelName:
    """The store's name for a registry name as typed (ollama's short form)."""
    ref = parse_ref(text)
    return ModelName.parse(short_name(ref.host or HOST, ref.namespace, ref.model, ref.tag))


def from_registry(text: str) -> bool:
    """Whether `tandem pull` / `/api/pull` of `text` goes to the ollama registry: a model name
    not in tandem's catalog, while the registry is not turned off."""
    name = ModelName.maybe(text)
    return name is not None and known_key(name.name, name.tag) is None and enabled()


def ensure_registry(
    store: Store, text: str, progress: Progress | None = None, refresh: bool = False
) -> tuple[ModelName, Manifest]:
    """The stored model for `text`, pulled and registered when it is not stored yet (or always
    when `refresh`, as `tandem pull` does: blobs already here are not downloaded again)."""
    name = stored_name(text)
    manifest = None if refresh else store.get(name)
    if manifest is not None:
        return name, manifest
    ref = parse_ref(text)
    layers = _layers(fetch_manifest(ref, str(name)), str(name))
    files = [(media, fetch_blob(ref, digest, size, str(name))) for media, digest, size in layers]
    gguf = next(path for media, path in files if media == MODEL)
    mf = _modelfile(gguf, [(m, p) for m, p in files if m != MODEL], str(name), ref)
    return name, create_model(store, name, mf, Path("."), None, progress, gguf)


def _layers(raw: bytes, name: str) -> list[tuple[str, str, int]]:
    """The layers to download: the one model layer and those whose settings tandem uses."""
    try:
        layers = manifest_layers(raw)
    except ValueError as err:
        raise PullError(
            f"{name}: the registry's answer is not an ollama manifest ({err})"
        ) from None
    models = sum(media == MODEL for media, _, _ in layers)
    if models != 1:
        raise PullError(f"{name}: the registry's manifest has {models} model layers, not 1")
    for media, _, _ in layers:
        if media not in USED:
            log.warning("%s: its %s layer is not used (tandem runs text models)", name, media)
    return [layer for layer in layers if layer[0] in USED]


def _modelfile(gguf: Path, others: list[tuple[str, Path]], name: str, ref: RegistryRef):
    """The Modelfile the model's other layers amount to (FROM its GGUF blob)."""
    try:
        found = layer_settings(others, name)
    except ModelNotFoundError as err:  # worded for ollama's store: say where it came from
        raise PullError(f"{name}: a layer from {ref.base} cannot be used: {err}") from None
    return Modelfile(
        from_=str(gguf),
        parameters=found.parameters,
        template=found.template,
        system=found.system,
        adapters=[str(p) for p in found.adapters],
        license=found.license,
        messages=found.messages,
    )
