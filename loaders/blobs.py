"""The model store's files on disk, safe against crashes and concurrent writers (threads or
processes): the helpers that modelfiles.store and loaders.pull share.

- Every file is written under a unique temporary name in its final directory, flushed and
  fsynced, then renamed over its place (`atomic_write`, `partial` + `publish`), so a reader
  sees the old file or the new one, never half of one, and two writers never share a file.
- A writer holds an flock on its partial file (or on a work folder's `.lock`) while it works,
  so `clean_stale` can tell a live writer from one that was killed: what is unlocked and older
  than STALE_AFTER_S is left over from a crash and is deleted when the store is opened.
- `locked(path)` is an flock on a lock file: it excludes other threads and other processes.
- Verification: a blob is hashed when it is written or pulled; `mark_verified` then records its
  size, mtime, ctime and inode under models/verified/, and `verify` trusts a blob whose stat
  still matches that record (cheap, at every load) and hashes it again otherwise.

    TANDEM_HOME/models/locks/      lock files (one per name, one per pulled digest, the store's)
    TANDEM_HOME/models/verified/   sha256-<hex>: {"size", "mtime_ns", "ctime_ns", "ino"}
    TANDEM_HOME/tmp/               work folders of running pulls (wheels)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

STALE_AFTER_S = 10.0  # an unlocked partial file this old belongs to no live writer
CHUNK = 1 << 20


def models_dir(home: Path) -> Path:
    return home / "models"


def work_root(home: Path) -> Path:
    return home / "tmp"


def lock_path(home: Path, key: str) -> Path:
    return models_dir(home) / "locks" / f"{key}.lock"


@contextlib.contextmanager
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an flock on `path` (created if needed): exclusive, or shared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def partial(
    directory: Path, prefix: str, suffix: str = ".partial"
) -> Iterator[tuple[BinaryIO, Path]]:
    """A new, uniquely named file in `directory`, locked by this writer while the block runs;
    deleted at the end unless `publish` moved it into place."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    path = Path(name)
    f = os.fdopen(fd, "w+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield f, path
    finally:
        f.close()
        path.unlink(missing_ok=True)


def publish(tmp: Path, target: Path) -> None:
    """fsync `tmp` (its writer has flushed it) and rename it over `target`."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` by `data` all at once (unique temp file, fsync, rename)."""
    with partial(path.parent, f".{path.name}.", ".tmp") as (f, tmp):
        f.write(data)
        f.flush()
        publish(tmp, path)


@contextlib.contextmanager
def work_dir(home: Path, prefix: str) -> Iterator[Path]:
    """A private folder under TANDEM_HOME/tmp, locked (its `.lock`) while the block runs."""
    root = work_root(home)
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)
        shutil.rmtree(path, ignore_errors=True)


# ---- verification -----------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(blob: Path) -> Path:
    return blob.parent.parent / "verified" / blob.name


def _stamp(blob: Path, hexdigest: str) -> dict:
    st = blob.stat()
    return {
        "sha256": hexdigest,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
    }


def mark_verified(blob: Path, hexdigest: str) -> None:
    """Record that `blob` (as it is now on disk) holds bytes whose sha256 is `hexdigest`."""
    marker = _marker(blob)
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(marker, json.dumps(_stamp(blob, hexdigest)).encode())


def forget(blob: Path) -> None:
    _marker(blob).unlink(missing_ok=True)


def is_marked(blob: Path, hexdigest: str) -> bool:
    """True when the record of `blob` matches its stat now (no hashing)."""
    try:
        recorded = json.loads(_marker(blob).read_bytes())
        return recorded == _stamp(blob, hexdigest)
    except (OSError, ValueError):
        return False


def verify(blob: Path, hexdigest: str, full: bool = False) -> bool:
    """Whether `blob` holds the bytes of `hexdigest`: trusted from its record when the stat
    still matches (unless `full`), else hashed (and recorded when right, forgotten when not).
    A missing blob is False."""
    if not full and is_marked(blob, hexdigest):
        return True
    try:
        good = sha256_file(blob) == hexdigest
    except OSError:
        good = False
    if good:
        mark_verified(blob, hexdigest)
    else:
        forget(blob)
    return good


# ---- what a killed writer leaves behind ---------------------------------------------------


def _unlocked(path: Path) -> bool:
    """True when no process holds an flock on `path` (a probe that takes and drops one)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _old(path: Path, now: float) -> bool:
    try:
        return now - path.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def clean_stale(home: Path) -> list[Path]:
    """Delete what killed writers left: partial blobs, manifest temp files, pull work folders
    (unlocked and older than STALE_AFTER_S), and verification records of vanished blobs.
    Returns what was deleted; never raises for a file it cannot touch."""
    models, now, gone = models_dir(home), time.time(), []
    files = [
        *models.glob("blobs/*.partial"),
        *models.glob("blobs/*.tmp"),
        *models.glob("manifests/**/.*.tmp"),
        *models.glob("verified/.*.tmp"),
    ]
    for path in files:
        if _old(path, now) and _unlocked(path):
            with contextlib.suppress(OSError):
                path.unlink()
                gone.append(path)
    root = work_root(home)
    for folder in root.iterdir() if root.is_dir() else ():
        lock = folder / ".lock"
        if folder.is_dir() and _old(folder, now) and (not lock.exists() or _unlocked(lock)):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    for marker in models.glob("verified/sha256-*"):
        if not (models / "blobs" / marker.name).exists():
            with contextlib.suppress(OSError):
                marker.unlink()
    for path in gone:
        log.info("removed %s, left by an interrupted create or pull", path)
    return gone
