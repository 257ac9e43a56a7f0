"""ModelSpec: what a model reference (`tandem run X`, `LLM(X)`, a request's "model") stands
for — the GGUF file, its adapters and the Modelfile's settings — and `resolve(ref)`.

A reference is, in order: the path of a .gguf file (bare: no settings); a model in tandem's
store (`name[:tag]`, `hf.co/user/repo:quant`); a model another tool keeps on this machine
(ollama's store, the Hugging Face cache, LM Studio's folder: modelfiles/local_stores.py), used
in place with the settings its ollama layers give; `hf.co/USER/REPO[:QUANT]` pulled from the
hub (modelfiles/hf_models.py); a catalog name, pulled and registered from its built-in
Modelfile on first use (so `tandem run smollm2` works on a fresh machine); any other name
pulled from an ollama registry (modelfiles/registry_models.py; TANDEM_OLLAMA_REGISTRY=off: not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loaders import ollama_pull as registry
from loaders.hf_pull import is_hf_ref
from loaders.pull import known_key
from modelfiles import local_stores, ollama_store
from modelfiles.builder import ensure_builtin
from modelfiles.hf_models import ensure_hf, stored_name
from modelfiles.local_model import OLLAMA, LocalModel, Settings
from modelfiles.manifest import Manifest
from modelfiles.names import ModelName
from modelfiles.registry_models import ensure_registry
from modelfiles.registry_models import stored_name as registry_name
from modelfiles.store import Store
from quant.errors import ModelNotFoundError


@dataclass
class ModelSpec:
    name: str
    path: Path  # the GGUF
    adapters: list[Path] = field(default_factory=list)  # LoRA GGUFs, applied in order
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None  # a Modelfile TEMPLATE (Go-template form)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    source: str | None = None  # the other tool whose file this is (ollama, huggingface, ...)


def resolve(ref: str | Path, store: Store | None = None) -> ModelSpec:
    """The ModelSpec for a path or model name; ModelNotFoundError listing what is known."""
    path = Path(ref).expanduser()
    if path.is_file():
        return ModelSpec(path.name, path)
    text = str(ref).strip()
    store = store or Store()
    stored = _stored(store, text)
    if stored is not None:
        return _spec(store, text, stored)
    local = local_stores.find(text)
    if local is not None:
        return local_spec(text, local)
    if is_hf_ref(text):
        return _spec(store, text, ensure_hf(store, text)[1])
    name = ModelName.maybe(text)
    if text.endswith(".gguf") or "\\" in text or (name is None and "/" in text):
        raise ModelNotFoundError(f"no model file at {path}")
    if name is None:
        raise ModelNotFoundError(f"{text!r} is neither a model name nor the path of a .gguf file")
    if known_key(name.name, name.tag) is None and registry.enabled():  # the catalog first
        return _spec(store, text, ensure_registry(store, text)[1])
    if "/" in text:
        raise ModelNotFoundError(f"no model file at {path} ({registry.REGISTRY_ENV} is off)")
    return _spec(store, text, ensure_builtin(store, name))


def _stored(store: Store, text: str) -> Manifest | None:
    """The manifest tandem's own store holds for `text`, None when it holds none (a registry
    name is looked up in ollama's short form: `library/x` is `x`)."""
    if is_hf_ref(text):
        return store.get(stored_name(text))
    name = ModelName.maybe(text)
    if name is not None and "/" in name.name:
        name = registry_name(text)
    return store.get(name) if name is not None else None


def local_spec(text: str, model: LocalModel) -> ModelSpec:
    """The spec of a model another tool keeps: its GGUF where it lies, its layers' settings."""
    settings = ollama_store.settings(model) if model.source == OLLAMA else Settings()
    return ModelSpec(
        text,
        model.path,
        settings.adapters,
        settings.parameters,
        settings.template,
        settings.system,
        settings.messages,
        model.source,
    )


def _spec(store: Store, text: str, manifest: Manifest) -> ModelSpec:
    # a missing or damaged blob is refused (its verification record, or a hash: store.py)
    blobs = [store.check_blob(layer, text) for layer in (manifest.model, *manifest.adapters)]
    return ModelSpec(
        text,
        blobs[0],
        blobs[1:],
        dict(manifest.parameters),
        manifest.template,
        manifest.system,
        [dict(m) for m in manifest.messages],
    )
