"""Store: the models under TANDEM_HOME/models — sha256-addressed blobs and one JSON manifest
per name:tag (see manifest.py).

    models/blobs/sha256-<hex>                 GGUF models and adapters (pull.py writes here too)
    models/manifests/<name>/<tag>.json        Manifest

Blobs are written to a temporary file beside their final place and renamed once hashed, so a
crash leaves no half blob under a digest name. Removing a model deletes the blobs that only it
used; blobs no manifest ever named (a pull not yet registered) are left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from loaders.pull import KNOWN, tandem_home
from modelfiles.manifest import Layer, Manifest
from modelfiles.names import ModelName
from runtime.errors import ModelNotFoundError

Progress = Callable[[str], None]
_CHUNK = 1 << 20
_BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")


class Store:
    def __init__(self, home: Path | None = None) -> None:
        self.root = (home or tandem_home()) / "models"
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"

    # ---- blobs ---------------------------------------------------------------------
    def blob_path(self, layer: Layer) -> Path:
        return self.blobs / f"sha256-{layer.hex}"

    def import_file(self, path: Path, progress: Progress | None = None) -> Layer:
        """Copy `path` into the blob store (hashing as it copies); an existing blob is kept."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="import-", suffix=".partial", dir=self.blobs)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            return self._commit(Path(tmp), digest.hexdigest(), progress)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def adopt(self, tmp: Path, progress: Progress | None = None) -> Layer:
        """Move a file written elsewhere in the blob directory under its digest."""
        try:
            return self._commit(tmp, _hash_file(tmp), progress)
        finally:
            tmp.unlink(missing_ok=True)

    def _commit(self, tmp: Path, hexdigest: str, progress: Progress | None) -> Layer:
        layer = Layer(f"sha256:{hexdigest}", tmp.stat().st_size)
        target = self.blob_path(layer)
        if target.is_file():
            _say(progress, f"using existing layer {layer.digest}")
        else:
            os.replace(tmp, target)
            _say(progress, f"writing layer {layer.digest} ({layer.size} bytes)")
        return layer

    def existing_layer(self, path: Path) -> Layer | None:
        """The Layer of `path` if it already is a blob of this store (no copy needed)."""
        in_blobs = Path(os.path.abspath(path)).parent == Path(os.path.abspath(self.blobs))
        if not in_blobs or not _BLOB_NAME.fullmatch(path.name) or not path.is_file():
            return None
        return Layer("sha256:" + path.name.removeprefix("sha256-"), path.stat().st_size)

    # ---- manifests -----------------------------------------------------------------
    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests / name.name / f"{name.tag}.json"

    def get(self, name: ModelName) -> Manifest | None:
        path = self.manifest_path(name)
        if not path.is_file():
            return None
        return Manifest.from_json(path.read_text(encoding="utf-8"), str(path))

    def require(self, name: ModelName) -> Manifest:
        manifest = self.get(name)
        if manifest is None:
            stored = ", ".join(str(n) for n, _ in self.list()) or "none"
            how = (
                f"pull it with `tandem pull {name.name}`"
                if name.name in KNOWN
                else "create it with `tandem create NAME -f Modelfile`"
            )
            raise ModelNotFoundError(
                f"model {str(name)!r} is not in the store (stored models: {stored}); {how}"
            )
        return manifest

    def put(self, name: ModelName, manifest: Manifest) -> None:
        for layer in (manifest.model, *manifest.adapters):
            if not self.blob_path(layer).is_file():
                raise ModelNotFoundError(f"blob {layer.digest} of {name} is missing")
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(manifest.to_json(), encoding="utf-8")
        os.replace(tmp, path)

    def list(self) -> list[tuple[ModelName, Manifest]]:
        """Every stored model, most recently written first."""
        names = sorted(
            self._names(),
            key=lambda n: (self.manifest_path(n).stat().st_mtime, str(n)),
            reverse=True,
        )
        found = [(name, self.get(name)) for name in names]
        return [(n, m) for n, m in found if m is not None]

    def _names(self) -> Iterator[ModelName]:
        if not self.manifests.is_dir():
            return
        for path in self.manifests.glob("*/*.json"):
            name = ModelName.maybe(f"{path.parent.name}:{path.stem}")
            if name is not None:
                yield name

    def copy(self, src: ModelName, dst: ModelName) -> None:
        self.put(dst, self.require(src))

    def remove(self, name: ModelName) -> list[Layer]:
        """Delete the model; returns the blobs deleted with it (those no other model uses)."""
        manifest = self.require(name)
        self.manifest_path(name).unlink()
        try:
            self.manifest_path(name).parent.rmdir()
        except OSError:
            pass  # other tags remain
        in_use = {layer for _, m in self.list() for layer in (m.model, *m.adapters)}
        freed = [layer for layer in {manifest.model, *manifest.adapters} if layer not in in_use]
        for layer in freed:
            self.blob_path(layer).unlink(missing_ok=True)
        return freed


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)
