"""A GGUF model file opened read-only through mmap, with zero-copy torch views of tensors.

`GGUFFile(path)` maps the file, parses and validates its header with `parse_gguf` (see
loaders/gguf_parse.py) and keeps the header fields as attributes. `tensor_bytes(name)` and
`tensor(name)` return uint8 torch tensors that VIEW the mapping (no copy, no read until
touched).

The mapping is read-only: the views must never be written to (writing a read-only page
kills the process with SIGSEGV). Copy (`.clone()`, `.to(device)`) before modifying.
`close()` never pulls memory from under live views: each view holds a reference to the mmap
object, which is unmapped when the last reference (ours or a view's) goes away.
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import gguf
import torch

from loaders.gguf_parse import TensorInfo, parse_gguf
from runtime.errors import GGUFError

__all__ = ["GGUFFile", "TensorInfo"]


def _open_mmap(path: Path) -> tuple[mmap.mmap, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFError(f"{path}: the file is empty, not a GGUF file")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from e


class GGUFFile:
    """A validated GGUF file: header fields as attributes, tensors as zero-copy views."""

    path: Path
    version: int
    metadata: dict[str, Any]
    metadata_types: dict[str, gguf.GGUFValueType]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    file_size: int

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        self._derived: dict[object, Any] = {}
        self._derived_lock = threading.Lock()
        mapping, self.file_size = _open_mmap(self.path)
        try:
            header = parse_gguf(mapping, source=str(self.path))
        except BaseException:
            try:
                mapping.close()
            except BufferError:
                pass  # something still exports it; it unmaps when collected
            raise
        self._mmap = mapping
        self.version = header.version
        self.metadata = header.metadata
        self.metadata_types = header.metadata_types
        self.tensors = header.tensors
        self.alignment = header.alignment
        self.data_offset = header.data_offset

    def info(self, name: str) -> TensorInfo:
        """The TensorInfo of `name`; GGUFError naming the file if there is no such tensor."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(
                f"{self.path}: no tensor named {name!r} (the file has {len(self.tensors)} tensors)"
            ) from None

    def tensor_bytes(self, name: str) -> torch.Tensor:
        """The tensor's raw bytes: a 1-D uint8 view of the mapping (read-only in fact)."""
        info = self.info(name)
        if self._mmap is None:
            raise GGUFError(f"{self.path}: the file is closed (reading tensor {name!r})")
        with warnings.catch_warnings():
            # torch warns (once) that the buffer is read-only; that is by design here
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(
                self._mmap, dtype=torch.uint8, count=info.nbytes, offset=info.offset
            )

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a uint8 (n_rows, row_bytes) view: one row per ne0-long row."""
        info = self.info(name)
        return self.tensor_bytes(name).view(info.n_rows, info.row_bytes)

    def derived(self, key: object, make: Callable[[], Any]) -> Any:
        """`make()`'s value for `key`, made once and kept as long as this object: what is
        computed from the file's tensors (re-laid-out weights) is shared by every model on it."""
        with self._derived_lock:
            if key not in self._derived:
                self._derived[key] = make()
            return self._derived[key]

    def release_pages(self, name: str) -> None:
        """Drop the process's mapped pages of tensor `name` (madvise MADV_DONTNEED) after a
        copy has been made of it: they leave the resident set, stay in the page cache, and a
        later read of a view faults them back in from the file, unchanged."""
        info = self.info(name)
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-info.offset // page) * page  # whole pages inside the tensor only
        end = (info.offset + info.nbytes) // page * page
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Drop the mapping: unmapped now if no views are alive, else when the last goes.

        Never `mmap.close()` here: torch.frombuffer keeps a reference to the mmap object
        but no buffer export, so an explicit close would unmap memory under live views.
        """
        self._mmap = None

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, version={self.version}, "
            f"{len(self.metadata)} keys, {len(self.tensors)} tensors)"
        )
