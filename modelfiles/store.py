"""Store: the models under TANDEM_HOME/models — sha256-addressed blobs and one JSON manifest
per name:tag (see manifest.py).

    models/blobs/sha256-<hex>                 GGUF models and adapters (pull.py writes here too)
    models/manifests/<name>/<tag>.json        Manifest
    models/locks/, models/verified/, tmp/     locks, blob verification records, pull work

Every file is written to a unique, locked temporary file beside its place, fsynced and renamed
(loaders/blobs.py), so a crash leaves no half blob or manifest, and what a killed writer left is
deleted when a Store is opened. Writing or removing a name holds that name's lock (an flock, so
it holds across processes); removals also hold the store's lock exclusively, writes shared, so a
blob is never freed under a manifest being written.

Blobs are verified (sha256) when they are written and when create or copy uses one; the result
is recorded by size, mtime, ctime and inode, and a load checks only that record (`check_blob`),
hashing again only when the file changed since. A damaged blob is never used silently: create
replaces it by its own good copy, pull downloads it again, a load refuses it.

A manifest that cannot be read is *damaged*: `list()` leaves it out (with a log line),
`entries()` reports it, `remove()` deletes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from loaders.blobs import (
    atomic_write,
    clean_stale,
    forget,
    lock_path,
    locked,
    mark_verified,
    partial,
    publish,
    sha256_file,
    verify,
)
from loaders.pull import known_key, tandem_home
from modelfiles.manifest import Layer, Manifest, damaged
from modelfiles.names import ModelName
from quant.errors import ModelNotFoundError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
_CHUNK = 1 << 20
_BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_reported: set[tuple[str, int]] = set()  # damaged manifests already logged (path, mtime)


@dataclass(frozen=True)
class Entry:
    """One manifest file: its model, or why it cannot be read (`damaged`)."""

    name: ModelName
    path: Path
    mtime: float
    manifest: Manifest | None
    damaged: str | None = None


class Store:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or tandem_home()
        self.root = self.home / "models"
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        try:
            clean_stale(self.home)
        except OSError as err:  # a read-only or odd store still lists and loads
            log.warning("could not clean up %s: %s", self.root, err)

    # ---- blobs ---------------------------------------------------------------------
    def blob_path(self, layer: Layer) -> Path:
        return self.blobs / f"sha256-{layer.hex}"

    def import_file(self, path: Path, progress: Progress | None = None) -> Layer:
        """Copy `path` into the blob store (hashing as it copies); a present, intact blob is
        kept, a damaged one replaced."""
        with partial(self.blobs, "import-") as (out, tmp):
            digest = hashlib.sha256()
            with open(path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            out.flush()
            return self._commit(tmp, digest.hexdigest(), progress)

    def adopt(self, tmp: Path, progress: Progress | None = None) -> Layer:
        """Move a file written (and flushed) elsewhere in the blob directory under its digest."""
        try:
            return self._commit(tmp, sha256_file(tmp), progress)
        finally:
            tmp.unlink(missing_ok=True)

    def _commit(self, tmp: Path, hexdigest: str, progress: Progress | None) -> Layer:
        layer = Layer(f"sha256:{hexdigest}", tmp.stat().st_size)
        target = self.blob_path(layer)
        if target.is_file() and verify(target, hexdigest):
            _say(progress, f"using existing layer {layer.digest}")
            return layer
        if target.is_file():
            _say(progress, f"replacing damaged layer {layer.digest}")
        else:
            _say(progress, f"writing layer {layer.digest} ({layer.size} bytes)")
        publish(tmp, target)
        mark_verified(target, hexdigest)
        return layer

    def existing_layer(self, path: Path) -> Layer | None:
        """The Layer of `path` if it already is an intact blob of this store (no copy needed);
        ModelNotFoundError when it is a blob whose bytes no longer match its name."""
        in_blobs = Path(os.path.abspath(path)).parent == Path(os.path.abspath(self.blobs))
        if not in_blobs or not _BLOB_NAME.fullmatch(path.name) or not path.is_file():
            return None
        layer = Layer("sha256:" + path.name.removeprefix("sha256-"), path.stat().st_size)
        self.check_blob(layer)
        return layer

    def check_blob(self, layer: Layer, name: object = None) -> Path:
        """The path of an intact blob: its verification record matches the file (or, when it
        does not, hashing it again does); ModelNotFoundError for a missing or damaged blob."""
        path = self.blob_path(layer)
        whose = f" of model {str(name)!r}" if name is not None else ""
        if not path.is_file():
            raise ModelNotFoundError(
                f"the blob {path.name}{whose} is gone; create (or pull) the model again"
            )
        if path.stat().st_size != layer.size or not verify(path, layer.hex):
            raise ModelNotFoundError(
                f"the blob {path.name}{whose} is damaged (its sha256 no longer matches); "
                "pull the model again (`tandem pull NAME`) or create it again"
            )
        return path

    # ---- manifests -----------------------------------------------------------------
    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests / name.name / f"{name.tag}.json"

    def _name_lock(self, name: ModelName):
        return locked(lock_path(self.home, f"manifest-{name.name}:{name.tag}"))

    def _store_lock(self, shared: bool):
        return locked(lock_path(self.home, "store"), shared=shared)

    def get(self, name: ModelName) -> Manifest | None:
        """The manifest of `name`, None when there is none; ModelNotFoundError when it is
        damaged (the message says to remove it)."""
        path = self.manifest_path(name)
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None  # removed meanwhile
        except OSError as err:
            raise damaged(str(path), f"cannot be read: {err.strerror}") from None
        return Manifest.from_json(data, str(path))

    def require(self, name: ModelName) -> Manifest:
        manifest = self.get(name)
        if manifest is None:
            stored = ", ".join(str(n) for n, _ in self.list()) or "none"
            how = (
                f"pull it with `tandem pull {known_key(name.name, name.tag)}`"
                if known_key(name.name, name.tag)
                else "create it with `tandem create NAME -f Modelfile`"
            )
            raise ModelNotFoundError(
                f"model {str(name)!r} is not in the store (stored models: {stored}); {how}"
            )
        return manifest

    def put(self, name: ModelName, manifest: Manifest) -> None:
        """Write the manifest of `name` (replacing any), after checking its blobs are intact."""
        path = self.manifest_path(name)
        with self._name_lock(name), self._store_lock(shared=True):
            for layer in (manifest.model, *manifest.adapters):
                self.check_blob(layer, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, manifest.to_json().encode("utf-8"))

    def entries(self) -> list[Entry]:
        """Every manifest file, most recently written first, damaged ones included."""
        found = []
        for name in self._names():
            path = self.manifest_path(name)
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue  # removed meanwhile
            try:
                manifest, why = self.get(name), None
            except FileNotFoundError:
                continue  # removed meanwhile
            except ModelNotFoundError as err:
                manifest, why = None, str(err)
            if manifest is not None or why is not None:
                found.append(Entry(name, path, mtime, manifest, why))
        return sorted(found, key=lambda e: (e.mtime, str(e.name)), reverse=True)

    def list(self) -> list[tuple[ModelName, Manifest]]:
        """Every stored model, most recently written first; damaged manifests are left out
        (and logged once)."""
        out = []
        for entry in self.entries():
            if entry.manifest is not None:
                out.append((entry.name, entry.manifest))
            elif (str(entry.path), int(entry.mtime)) not in _reported:
                _reported.add((str(entry.path), int(entry.mtime)))
                log.warning("skipping %s: %s", entry.name, entry.damaged)
        return out

    def _names(self) -> Iterator[ModelName]:
        if not self.manifests.is_dir():
            return
        for path in self.manifests.glob("**/*.json"):
            folder = path.parent.relative_to(self.manifests).as_posix()
            name = ModelName.maybe(f"{folder}:{path.stem}")
            if name is not None and self.manifest_path(name) == path:
                yield name

    def copy(self, src: ModelName, dst: ModelName) -> None:
        self.put(dst, self.require(src))

    def remove(self, name: ModelName) -> list[Layer]:
        """Delete the model, a damaged manifest too; returns the blobs deleted with it (those
        no other manifest names)."""
        path = self.manifest_path(name)
        with ExitStack() as stack:
            stack.enter_context(self._name_lock(name))
            try:
                manifest = self.get(name)
                if manifest is None:
                    manifest = self.require(name)  # raises, listing what is stored
                layers = {manifest.model, *manifest.adapters}
            except ModelNotFoundError:
                if not path.is_file():
                    raise
                layers = _named_layers(path)  # damaged: the digests it still names
            stack.enter_context(self._store_lock(shared=False))
            path.unlink()
            for folder in (path.parent, *path.parent.parents):
                if folder == self.manifests or self.manifests not in folder.parents:
                    break
                try:
                    folder.rmdir()
                except OSError:
                    break  # other tags (or models) remain
            in_use = set()
            for entry in self.entries():
                if entry.manifest is not None:
                    in_use.update((entry.manifest.model, *entry.manifest.adapters))
                else:
                    in_use.update(_named_layers(entry.path))
            in_use_digests = {layer.digest for layer in in_use}
            freed = [layer for layer in layers if layer.digest not in in_use_digests]
            for layer in freed:
                self.blob_path(layer).unlink(missing_ok=True)
                forget(self.blob_path(layer))
        return freed


def _named_layers(path: Path) -> set[Layer]:
    """The blob digests a (damaged) manifest file still spells out."""
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return set()
    return {Layer(d, 0) for d in _DIGEST.findall(text)}


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)
