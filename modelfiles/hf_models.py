"""Models from Hugging Face (`hf.co/USER/REPO[:QUANT]`): pulled once (loaders/hf_pull.py),
then registered in the store like any model, named `hf.co/user/repo:quant` (and
`hf.co/user/repo:latest` when no quant was given), so `tandem run` and `tandem list` find them
without the network afterwards.

A split GGUF set is merged into one GGUF blob (modelfiles/gguf_merge.py): tandem's loader
maps one file per model. The shards stay as verified blobs, so a second pull downloads nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loaders.hf_pull import parse_ref, pull_hf
from modelfiles.builder import create_model
from modelfiles.manifest import Manifest
from modelfiles.modelfile import Modelfile
from modelfiles.names import ModelName
from modelfiles.store import Store

Progress = Callable[[str], None]


def stored_name(text: str) -> ModelName:
    """The store's name for a reference as typed (`:latest` when it names no quant)."""
    ref = parse_ref(text)
    return ModelName.parse(ref.name(ref.quant or "latest"))


def ensure_hf(
    store: Store, text: str, progress: Progress | None = None, refresh: bool = False
) -> tuple[ModelName, Manifest]:
    """The stored model for `text`, pulled and registered when it is not stored yet (or always
    when `refresh`, as `tandem pull` does: present blobs are kept, not downloaded again)."""
    name = stored_name(text)
    manifest = None if refresh else store.get(name)
    if manifest is not None:
        return name, manifest
    say = progress or (lambda message: None)
    model = pull_hf(text)
    path = model.blobs[0]
    if len(model.blobs) > 1:
        from modelfiles.gguf_merge import merge_split

        say(f"merging {len(model.blobs)} split files")
        path = merge_split(store, list(model.blobs))
    canonical = ModelName.parse(model.ref.name(model.quant))
    manifest = create_model(
        store, canonical, Modelfile(from_=str(path)), Path("."), None, say, path
    )
    if name != canonical:
        store.put(name, manifest)
    return canonical, manifest
