"""A GGUF model file opened read-only through mmap, with zero-copy torch views of tensors.

`GGUFFile(path)` maps the file, parses and validates its header with `parse_gguf` (see
loaders/gguf_parse.py) and keeps the header fields as attributes. `tensor_bytes(name)` and
`tensor(name)` return uint8 torch tensors that VIEW the mapping (no copy, no read until
touched).

The mapping is read-only: the views must never be written to (writing a read-only page
kills the process with SIGSEGV). Copy (`.clone()`, `.to(device)`) before modifying.
`close()` never pulls memory from under live views: each view holds a reference to the mmap
object, which is unmapped when the last reference (ours or a view's) goes away.

A mapping reads the file as it is NOW: if the file is truncated or rewritten while views are
alive, the next read of a vanished page kills the process with SIGBUS. `detach()` (call it
once the model is built) ends that: it replaces the mapping, in place and at the same
addresses, by anonymous memory holding the same bytes where a view may still read them (the
header, tensors handed out as views and not released), so every view already handed out
owns its memory from then on; nothing reads the mapping's file again. A later `tensor()`
of any other tensor reads it afresh (refusing with GGUFError if the file changed).
`tensor(name, copy=True)` gives one tensor in memory of its own.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import gguf
import numpy as np
import torch

from loaders.gguf_parse import TensorInfo, parse_gguf
from quant.errors import GGUFError

__all__ = ["GGUFFile", "TensorInfo"]


def _open_mmap(path: Path) -> tuple[mmap.mmap, os.stat_result]:
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            if stat.st_size == 0:
                raise GGUFError(f"{path}: the file is empty, not a GGUF file")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), stat
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from e


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class _Memory:
    """The few libc calls that swap a file mapping for anonymous memory in place."""

    PROT_READ, PROT_WRITE = 1, 2
    MAP_FIXED = 0x10  # the same on Linux and the BSDs/macOS
    MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2  # Linux
    FAILED = ctypes.c_void_p(-1).value

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.mmap = libc.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self.munmap = libc.munmap
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.mprotect = libc.mprotect
        self.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.mremap = getattr(libc, "mremap", None)  # Linux only
        if self.mremap is not None:
            self.mremap.restype = ctypes.c_void_p
            self.mremap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_void_p,
            ]

    def anonymous(self, size: int, at: int | None = None) -> int:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (self.MAP_FIXED if at else 0)
        addr = self.mmap(at, size, self.PROT_READ | self.PROT_WRITE, flags, -1, 0)
        if addr in (None, self.FAILED):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return addr

    def protect_read(self, addr: int, size: int) -> None:
        if self.mprotect(addr, size, self.PROT_READ):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    def move(self, src: int, size: int, dst: int) -> None:
        """Move the pages at `src` to `dst`, atomically replacing what was mapped there."""
        if self.mremap is None:
            raise OSError(errno.ENOSYS, "mremap is Linux only")
        flags = self.MREMAP_MAYMOVE | self.MREMAP_FIXED
        if self.mremap(src, size, size, flags, dst) in (None, self.FAILED):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


_LIBC: _Memory | None = None


def _memory() -> _Memory:
    global _LIBC
    if _LIBC is None:
        _LIBC = _Memory()
    return _LIBC


def _address(mapping: mmap.mmap) -> int:
    """Where `mapping` starts in this process's memory."""
    view = np.frombuffer(mapping, dtype=np.uint8, count=1)
    try:
        return view.ctypes.data
    finally:
        del view  # release the buffer export at once


def _subtract(total: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[0, total) without the (start, end) ranges in `holes`."""
    out, pos = [], 0
    for start, end in sorted(holes):
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < total:
        out.append((pos, total))
    return out


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
        self._map_lock = threading.Lock()  # the mapping's state: released pages, detached
        self._released: set[str] = set()  # tensors whose pages were dropped
        self._handed: set[str] = set()  # tensors handed out as views of the mapping
        self._resident: set[str] | None = None  # after detach(): those still held in memory
        mapping, stat = _open_mmap(self.path)
        self.file_size, self._identity = stat.st_size, _identity(stat)
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

    def tensor_bytes(self, name: str, copy: bool = False) -> torch.Tensor:
        """The tensor's raw bytes: a 1-D uint8 view of the mapping (read-only in fact), or
        with `copy` a tensor of its own (writable, independent of the file)."""
        info = self.info(name)
        if self._mmap is None:
            raise GGUFError(f"{self.path}: the file is closed (reading tensor {name!r})")
        if self._resident is not None and name not in self._resident:
            return self._read(info)  # not kept by detach(): read it afresh
        if copy:
            return self.tensor_bytes(name).clone()
        self._handed.add(name)
        with warnings.catch_warnings():
            # torch warns (once) that the buffer is read-only; that is by design here
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(
                self._mmap, dtype=torch.uint8, count=info.nbytes, offset=info.offset
            )

    def tensor(self, name: str, copy: bool = False) -> torch.Tensor:
        """The tensor as a uint8 (n_rows, row_bytes) view: one row per ne0-long row (with
        `copy`: in memory of its own)."""
        info = self.info(name)
        return self.tensor_bytes(name, copy).view(info.n_rows, info.row_bytes)

    def _read(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's bytes read from the file, which must be the file that was opened."""
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        try:
            with open(self.path, "rb") as f:
                self._check_unchanged(os.fstat(f.fileno()))
                self._pread(f.fileno(), out.numpy().data, info.offset)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read tensor {info.name!r}: {e}") from e
        return out

    def _pread(self, fd: int, into: memoryview, offset: int) -> None:
        """Fill `into` from the file at `offset` (reads return at most ~2 GiB each)."""
        done = 0
        while done < len(into):
            got = os.preadv(fd, [into[done : done + (1 << 30)]], offset + done)
            if got <= 0:
                raise GGUFError(f"{self.path}: changed since it was loaded; reload the model")
            done += got

    def _check_unchanged(self, stat: os.stat_result) -> None:
        if _identity(stat) != self._identity:
            raise GGUFError(
                f"{self.path}: the file changed since it was loaded (size {self.file_size} → "
                f"{stat.st_size}); reload the model"
            )

    def detach(self) -> None:
        """Put the mapped pages that views may still read into anonymous memory, in place
        (same addresses): the header and every tensor handed out as a view and not
        released. Every such view (and any view made from one) then reads memory of its
        own, and truncating or rewriting the file can no longer crash the process. The
        rest — tensors never handed out, and released ones (see `release_pages`), whose
        old views then read zeros — becomes untouched zero pages that cost nothing;
        `tensor()` of such a tensor later reads it afresh from the file, refusing with
        GGUFError if the file changed since it was opened. Idempotent."""
        with self._map_lock:
            if self._resident is not None or self._mmap is None:
                return
            page = mmap.PAGESIZE
            total = -(-self.file_size // page) * page
            addr = _address(self._mmap)
            resident = self._handed - self._released
            needed = [(0, self.data_offset)] + [
                (self.tensors[n].offset, self.tensors[n].offset + self.tensors[n].nbytes)
                for n in resident
            ]
            pages = [(start // page * page, -(-end // page) * page) for start, end in needed]
            keep = _subtract(total, _subtract(total, pages))  # the pages, merged
            try:
                self._copy_in(addr, total, keep)
            except OSError as e:
                raise GGUFError(f"{self.path}: cannot copy the file into memory: {e}") from e
            self._resident = resident

    def _copy_in(self, addr: int, total: int, keep: list[tuple[int, int]]) -> None:
        libc = _memory()
        with open(self.path, "rb") as f:
            self._check_unchanged(os.fstat(f.fileno()))
            atomic = libc.mremap is not None
            # Linux: fill a new region, then move it over the mapping in one step (readers
            # never see a gap); elsewhere: map over the mapping, then fill it.
            new = libc.anonymous(total, None if atomic else addr)
            try:
                for start, end in keep:
                    end = min(end, self.file_size)
                    buf = (ctypes.c_char * (end - start)).from_address(new + start)
                    self._pread(f.fileno(), memoryview(buf).cast("B"), start)
                libc.protect_read(new, total)
                if atomic:
                    libc.move(new, total, addr)
            except BaseException:
                if atomic:
                    libc.munmap(new, total)
                raise

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
            with self._map_lock:
                self._released.add(name)  # detach() leaves it out
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

    @property
    def detached(self) -> bool:
        """True once `detach()` made the mapping memory of its own."""
        return self._resident is not None

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
