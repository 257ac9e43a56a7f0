"""ModelSpec: what a model reference (`tandem run X`, `LLM(X)`, a request's "model") stands
for — the GGUF file, its adapters and the Modelfile's settings — and `resolve(ref)`.

A reference is, in order: the path of a .gguf file (bare: no settings); a stored model
`name[:tag]`; a pullable model name, pulled and registered from its built-in Modelfile on
first use (so `tandem run smollm2` works on a fresh machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfiles.builder import ensure_builtin
from modelfiles.names import ModelName
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


def resolve(ref: str | Path, store: Store | None = None) -> ModelSpec:
    """The ModelSpec for a path or model name; ModelNotFoundError listing what is known."""
    path = Path(ref).expanduser()
    if path.is_file():
        return ModelSpec(path.name, path)
    text = str(ref).strip()
    if text.endswith(".gguf") or "/" in text or "\\" in text:
        raise ModelNotFoundError(f"no model file at {path}")
    store = store or Store()
    name = ModelName.maybe(text)
    if name is None:
        raise ModelNotFoundError(f"{text!r} is neither a model name nor the path of a .gguf file")
    manifest = ensure_builtin(store, name)
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
