"""Creating stored models from Modelfiles (`tandem create`), with ollama's semantics.

FROM is resolved as ollama does: a path (absolute, `~`, or relative to the Modelfile's
directory) when such a file exists; else a stored model name, whose blobs and settings the
new model inherits; else a pullable model, which is pulled and registered from its built-in
Modelfile (modelfiles/builtin/) first. What the new Modelfile says overrides what it
inherits: PARAMETERs key by key, TEMPLATE and SYSTEM when given, MESSAGEs when any are
given; ADAPTERs and LICENSEs add to the inherited ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from loaders.blobs import partial
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from loaders.lora_adapter import LoraAdapter
from loaders.pull import KNOWN, known_key, pull
from modelfiles.gguf_quantizer import quantize_gguf, target_type
from modelfiles.manifest import Layer, Manifest
from modelfiles.modelfile import Modelfile
from modelfiles.names import ModelName
from modelfiles.parser import read_modelfile
from modelfiles.store import Progress, Store
from quant.errors import GGUFError, ModelfileError, ModelNotFoundError, UnsupportedError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def create_model(
    store: Store,
    name: ModelName,
    mf: Modelfile,
    base_dir: Path,
    quantize: str | None = None,
    progress: Progress | None = None,
    from_path: Path | None = None,
) -> Manifest:
    """Build `name` from the parsed Modelfile `mf` and store it; `from_path` (a GGUF) stands
    in for the FROM line (used for the built-in models)."""
    say = progress or (lambda message: None)
    for warning in mf.warnings:
        say(f"warning: {warning}")
    base = _import_gguf(store, from_path, say) if from_path else _base(store, mf, base_dir, say)
    model, quantization = base.model, base.quantization
    if quantize:
        model, quantization = _quantize(store, model, quantize, say), target_type(quantize).name
    adapters = base.adapters + [
        _import_adapter(store, a, base_dir, model, say) for a in mf.adapters
    ]
    manifest = Manifest(
        model=model,
        adapters=adapters,
        parameters={**base.parameters, **mf.parameters},
        template=mf.template if mf.template is not None else base.template,
        system=mf.system if mf.system is not None else base.system,
        license=base.license + mf.license,
        messages=mf.messages or base.messages,
        parent=base.parent,
        quantization=quantization,
    )
    say("writing manifest")
    store.put(name, manifest)
    say("success")
    return manifest


def ensure_builtin(store: Store, name: ModelName, progress: Progress | None = None) -> Manifest:
    """The stored model `name`, registering a pullable model (pulling it) on first use."""
    manifest = store.get(name)
    if manifest is not None:
        return manifest
    key = known_key(name.name, name.tag)
    if key is None:
        stored = ", ".join(str(n) for n, _ in store.list()) or "none"
        raise ModelNotFoundError(
            f"model {str(name)!r} is not known; stored models: {stored}; pullable models: "
            f"{', '.join(sorted(KNOWN))} (or give the path of a .gguf file)"
        )
    path = pull(key)
    mf = read_modelfile(BUILTIN_DIR / f"{key.replace(':', '-')}.Modelfile")
    return create_model(store, name, mf, BUILTIN_DIR, progress=progress, from_path=path)


def _local_path(text: str, base_dir: Path) -> Path | None:
    """The file FROM/ADAPTER `text` names, if it names one that exists (ollama's expandPath)."""
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base_dir / path
    return path if path.is_file() else None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~", "\\")) or "/" in text or text.endswith(".gguf")


def _base(store: Store, mf: Modelfile, base_dir: Path, say: Progress) -> Manifest:
    path = _local_path(mf.from_, base_dir)
    if path is not None:
        return _import_gguf(store, path, say)
    name = ModelName.maybe(mf.from_)
    if name is None or _looks_like_path(mf.from_):
        raise ModelfileError(
            f"FROM {mf.from_}: no such file (relative paths start at the "
            f"Modelfile's directory, {base_dir})",
            mf.from_line,
        )
    say(f"using base model {name}")
    try:
        inherited = ensure_builtin(store, name)
    except ModelNotFoundError as err:
        raise ModelfileError(f"FROM {mf.from_}: {err}", mf.from_line) from None
    return dataclasses.replace(inherited, parent=str(name))


def _import_gguf(store: Store, path: Path, say: Progress) -> Manifest:
    say(f"parsing GGUF {path}")
    gguf = GGUFFile(path)
    if gguf.metadata.get("general.type") == "adapter":
        raise GGUFError(f"{path} is an adapter; name it in ADAPTER, with the base model in FROM")
    ModelConfig.from_metadata(gguf.metadata, gguf.tensors.keys())  # tandem can run it
    gguf.close()
    return Manifest(model=_import(store, path, say))


def _import(store: Store, path: Path, say: Progress) -> Layer:
    layer = store.existing_layer(path)
    if layer is not None:
        say(f"using existing layer {layer.digest}")
        return layer
    say(f"copying file {path}")
    return store.import_file(path, say)


def _import_adapter(store: Store, text: str, base_dir: Path, base: Layer, say: Progress) -> Layer:
    path = _local_path(text, base_dir)
    if path is None:
        raise ModelfileError(
            f"ADAPTER {text}: no such file (relative paths start at the "
            f"Modelfile's directory, {base_dir})"
        )
    try:
        _check_fits(LoraAdapter.read(path), store.blob_path(base))
    except (GGUFError, UnsupportedError) as err:
        raise ModelfileError(f"ADAPTER {text}: {err}") from None
    return _import(store, path, say)


def _check_fits(adapter: LoraAdapter, base_path: Path) -> None:
    """Every adapted tensor exists in the base with the adapter's shape."""
    with GGUFFile(base_path) as base:
        arch = base.metadata.get("general.architecture")
        if adapter.arch and adapter.arch != arch:
            raise UnsupportedError(f"the adapter is for {adapter.arch}, the model is {arch}")
        for name, weight in adapter.weights.items():
            info = base.tensors.get(name)
            want = (weight.b.shape[0], weight.a.shape[1])  # (out, in)
            if info is None or tuple(reversed(info.shape)) != want:
                have = "missing" if info is None else f"{tuple(reversed(info.shape))}"
                raise UnsupportedError(
                    f"it changes {name} as {want}, but the model's {name} "
                    f"is {have}; was it made for this base model?"
                )


def _quantize(store: Store, model: Layer, target: str, say: Progress) -> Layer:
    target_type(target)  # an unknown type fails before any work
    source = store.check_blob(model)
    # the partial file stays locked while the quantizer writes it (through its own handle)
    with partial(store.blobs, "quantize-") as (_, out):
        say(f"quantizing model to {target.upper()}")
        say(quantize_gguf(source, out, target, say))
        return store.adopt(out, say)
