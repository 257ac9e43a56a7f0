"""A bounded, validating GGUF header parser that works on any byte buffer.

`parse_gguf(buf)` reads a GGUF v2/v3 (little-endian) header from bytes, bytearray,
memoryview or mmap holding the whole file. Everything is validated BEFORE anything sized by
the file is allocated: each count is checked against a cap and against the bytes that
remain (count x the smallest encoding of one element); array nesting is bounded; lengths,
value types, ggml types, shapes, alignment and tensor data ranges are checked. Every problem
raises `GGUFError` with one line: the source (when given), the problem, the offending value.

Layout (from gguf-py, whose constants we use): magic u32, version u32, n_tensors u64, n_kv
u64; KV = key string, value type u32, value; string = u64 length + UTF-8; array = item type
u32, count u64, items; tensor info = name, n_dims u32, ne[n_dims] u64 (ne[0] contiguous),
ggml type u32, offset u64 relative to the data section, which starts at the header end
rounded up to `general.alignment` (default 32).

Memory stays proportional to the header: arrays are kept compact, never as Python lists
(a list of ints costs 8-36 bytes per 1-4 byte item, a list of short strings ~60 bytes per
~10): numeric arrays as `NumericArray` (one read-only numpy array, a copy, so nothing keeps
the mapping), string arrays as `StringArray` (the array's bytes, one copy, plus one int64
offset per item: at most twice the bytes it came from). Both are read-only Sequences whose
items are plain Python values, so `len`, indexing, iteration, `==` with a list and
gguf-py's writer work as on lists; `.tolist()` gives the list. Counts of metadata keys,
tensors and nested arrays are capped far above real files, because each costs hundreds of
bytes of Python objects for a few bytes of file.
"""

from __future__ import annotations

import array
import math
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import gguf
import numpy as np

from loaders.gguf_arrays import NumericArray, StringArray
from quant.errors import GGUFError

VT = gguf.GGUFValueType

SUPPORTED_VERSIONS = (2, 3)
MAX_KV = 1 << 16  # metadata entries (real files: tens)
MAX_TENSORS = 1 << 16  # real files: hundreds to a few thousand
MAX_KEY_BYTES = 1 << 16  # keys and tensor names
MAX_STRING_BYTES = 64 << 20  # one string value (chat templates are tens of KB)
MAX_ARRAY_ITEMS = 1 << 24  # 64x the largest real vocab; also bounded by the bytes left
MAX_ARRAY_DEPTH = 3  # an array of arrays of arrays, no deeper
MAX_INNER_ARRAYS = 1 << 12  # arrays inside arrays, in the whole header (llama.cpp reads none)
MAX_DIMS = 4
MAX_ELEMENTS = (1 << 63) - 1  # ggml counts elements in int64
SHOW_CHARS = 80  # how much of an offending string an error message shows

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# value type -> struct/numpy format of one value (bool is a byte: 0 false, else true)
_FORMATS: dict[int, str] = {  # keyed by int: the file's type codes are looked up as read
    VT.UINT8: "B",
    VT.INT8: "b",
    VT.UINT16: "H",
    VT.INT16: "h",
    VT.UINT32: "I",
    VT.INT32: "i",
    VT.FLOAT32: "f",
    VT.BOOL: "B",
    VT.UINT64: "Q",
    VT.INT64: "q",
    VT.FLOAT64: "d",
}
_SCALARS = {t: (struct.Struct("<" + f), np.dtype("<" + f)) for t, f in _FORMATS.items()}
# the fewest bytes one value of each type can take (bounds counts before allocating)
_MIN_SIZE: dict[int, int] = {t: s.size for t, (s, _) in _SCALARS.items()}
_MIN_SIZE[VT.STRING] = 8  # length only (empty string)
_MIN_SIZE[VT.ARRAY] = 12  # item type + count (empty array)
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name len, 1-byte name, n_dims, ne0, type, offset


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file and how it is laid out."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # GGUF order: shape[0] = ne0 = the contiguous row length
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def row_bytes(self) -> int:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.ggml_type)]
        return self.shape[0] // block_size * type_size


@dataclass(frozen=True)
class GGUFHeader:
    """The parsed, validated header of a GGUF file."""

    version: int
    metadata: dict[str, Any]  # str, int, float, bool; arrays: GGUFArray (nested: lists of them)
    metadata_types: dict[str, gguf.GGUFValueType]  # each key's top-level value type
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int
    data_offset: int  # absolute start of the data section


def _show(value: str | bytes) -> str:
    """A short, single-line rendering of an offending string for error messages."""
    cut = value[:SHOW_CHARS]
    return repr(cut) + ("..." if len(value) > SHOW_CHARS else "")


class _BytesSlicer:
    """Slicing gives bytes, like bytes and mmap do (for memoryview and other buffers)."""

    __slots__ = ("mv",)

    def __init__(self, mv: memoryview) -> None:
        self.mv = mv

    def __getitem__(self, key: slice) -> bytes:
        return self.mv[key].tobytes()


class _Cursor:
    """A bounds-checked read position in the buffer; every read checks the bytes remain."""

    __slots__ = ("buf", "src", "pos", "end", "source", "inner_arrays")

    def __init__(self, buf: memoryview, src: Any, source: str | None) -> None:
        self.buf = buf
        self.src = src  # the same bytes; slicing it gives bytes (fast string decoding)
        self.pos = 0
        self.end = len(buf)
        self.source = source
        self.inner_arrays = 0  # arrays read inside arrays so far (capped: MAX_INNER_ARRAYS)

    def fail(self, problem: str) -> NoReturn:
        raise GGUFError(f"{self.source}: {problem}" if self.source else problem)

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            self.fail(
                f"truncated: {what} at offset {self.pos} needs {n} bytes but only "
                f"{self.end - self.pos} remain (file size {self.end})"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        value = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        value = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def count(self, n: int, what: str, min_size: int, cap: int) -> None:
        """Refuse a count the remaining bytes cannot hold or that exceeds `cap`."""
        if n > cap:
            self.fail(f"{what} {n} exceeds the limit of {cap}")
        if n * min_size > self.end - self.pos:
            self.fail(
                f"{what} {n} cannot fit in the {self.end - self.pos} bytes that remain "
                f"at offset {self.pos} (file size {self.end})"
            )

    def text(self, what: str, cap: int) -> str:
        n = self.u64(f"{what} length")
        if n > cap:
            self.fail(f"{what} length {n} exceeds the limit of {cap} bytes")
        self.need(n, what)
        raw = self.src[self.pos : self.pos + n]  # bytes: no export of the buffer lingers
        try:
            value = raw.decode()
        except UnicodeDecodeError:
            self.fail(f"{what} at offset {self.pos} is not valid UTF-8: {_show(bytes(raw))}")
        self.pos += n
        return value


def _scalar(cur: _Cursor, vtype: int, what: str) -> Any:
    packer = _SCALARS[vtype][0]
    cur.need(packer.size, what)
    value = packer.unpack_from(cur.buf, cur.pos)[0]
    cur.pos += packer.size
    return value != 0 if vtype == VT.BOOL else value


def _numeric_array(cur: _Cursor, itype: int, n: int) -> NumericArray:
    dtype = _SCALARS[itype][1]
    arr = np.frombuffer(cur.buf, dtype=dtype, count=n, offset=cur.pos)
    cur.pos += n * dtype.itemsize
    # a copy (native byte order): nothing may keep the file mapping alive or read it later
    return NumericArray(arr != 0 if itype == VT.BOOL else arr.astype(dtype.newbyteorder("=")))


def _string_array(cur: _Cursor, n: int, what: str) -> StringArray:
    """A tight loop for the big tokenizer arrays (262k strings in well under a second):
    each item's length and UTF-8 are checked; only its offset is kept (8 bytes per item)."""
    buf, src, first, pos, end = cur.buf, cur.src, cur.pos, cur.pos, cur.end
    unpack = _U64.unpack_from
    starts = array.array("q")
    append = starts.append
    try:
        for _ in range(n):
            length = unpack(buf, pos)[0]  # struct.error when fewer than 8 bytes remain
            stop = pos + 8 + length
            if stop > end or length > MAX_STRING_BYTES:
                break
            src[pos + 8 : stop].decode()  # validates; the text is made again when read
            append(pos - first)
            pos = stop
        else:
            cur.pos = pos
            append(pos - first)
            return StringArray(bytes(src[first:pos]), np.frombuffer(starts, dtype=np.int64))
    except (struct.error, UnicodeDecodeError):
        pass
    _bad_string(cur, pos, f"{what}[{len(starts)}]")


def _bad_string(cur: _Cursor, pos: int, what: str) -> NoReturn:
    """Re-read the string at `pos` the slow, checked way, which raises with the reason."""
    cur.pos = pos
    cur.text(what, MAX_STRING_BYTES)
    cur.fail(f"{what} at offset {pos}: unreadable string")  # not reached


def _array(cur: _Cursor, depth: int, what: str) -> Sequence[Any]:
    if depth > MAX_ARRAY_DEPTH:
        cur.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
    itype = cur.u32(f"{what} item type")
    if itype not in _MIN_SIZE:
        cur.fail(f"{what} has unknown array item type {itype}")
    n = cur.u64(f"{what} item count")
    cur.count(n, f"{what} item count", _MIN_SIZE[itype], MAX_ARRAY_ITEMS)
    if itype in _SCALARS:
        return _numeric_array(cur, itype, n)
    if itype == VT.STRING:
        return _string_array(cur, n, what)
    cur.inner_arrays += n
    if cur.inner_arrays > MAX_INNER_ARRAYS:
        cur.fail(f"{what}: more than {MAX_INNER_ARRAYS} arrays nested in arrays")
    return [_array(cur, depth + 1, f"{what}[{i}]") for i in range(n)]


def _value(cur: _Cursor, vtype: int, what: str) -> Any:
    if vtype in _SCALARS:
        return _scalar(cur, vtype, what)
    if vtype == VT.STRING:
        return cur.text(what, MAX_STRING_BYTES)
    return _array(cur, 1, what)


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, VT]]:
    metadata: dict[str, Any] = {}
    types: dict[str, VT] = {}
    for index in range(n_kv):
        key = cur.text(f"metadata key #{index}", MAX_KEY_BYTES)
        if not key:
            cur.fail(f"metadata key #{index} at offset {cur.pos - 8} is empty")
        if key in metadata:
            cur.fail(f"duplicate metadata key {_show(key)}")
        vtype = cur.u32(f"value type of key {_show(key)}")
        if vtype not in _MIN_SIZE:
            cur.fail(f"key {_show(key)} has unknown value type {vtype}")
        metadata[key] = _value(cur, vtype, f"value of key {_show(key)}")
        types[key] = VT(vtype)
    return metadata, types


def _alignment(cur: _Cursor, metadata: dict[str, Any], types: dict[str, VT]) -> int:
    if "general.alignment" not in metadata:
        return gguf.GGUF_DEFAULT_ALIGNMENT
    value, vtype = metadata["general.alignment"], types["general.alignment"]
    if vtype != VT.UINT32:
        cur.fail(f"general.alignment must be a uint32, not {vtype.name}")
    if value == 0 or value & (value - 1):
        cur.fail(f"general.alignment {value} is not a non-zero power of two")
    return value


def _tensor_nbytes(cur: _Cursor, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    label = f"tensor {_show(name)}"
    if any(d < 1 for d in shape):
        cur.fail(f"{label} has a zero dimension in shape {list(shape)}")
    n_elements = 1
    for d in shape:
        n_elements *= d
        if n_elements > MAX_ELEMENTS:
            cur.fail(f"{label} shape {list(shape)}: element count overflows 64 bits")
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        cur.fail(f"{label} has unknown ggml type {ggml_type}")
    if shape[0] % block_size:
        cur.fail(
            f"{label} row length {shape[0]} is not a multiple of the {qtype.name} "
            f"block size {block_size}"
        )
    return n_elements // block_size * type_size


def _read_tensor_info(cur: _Cursor, index: int, alignment: int) -> tuple[str, int, tuple, int, int]:
    name = cur.text(f"tensor #{index} name", MAX_KEY_BYTES)
    if not name:
        cur.fail(f"tensor #{index} at offset {cur.pos - 8} has an empty name")
    label = f"tensor {_show(name)}"
    n_dims = cur.u32(f"{label} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        cur.fail(f"{label} has {n_dims} dimensions (must be 1 to {MAX_DIMS})")
    cur.need(8 * n_dims, f"{label} shape")
    shape = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
    cur.pos += 8 * n_dims
    ggml_type = cur.u32(f"{label} ggml type")
    rel_offset = cur.u64(f"{label} data offset")
    nbytes = _tensor_nbytes(cur, name, shape, ggml_type)
    if rel_offset % alignment:
        cur.fail(f"{label} data offset {rel_offset} is not a multiple of the alignment {alignment}")
    return name, ggml_type, shape, rel_offset, nbytes


def _read_tensors(cur: _Cursor, n_tensors: int, alignment: int) -> tuple[dict, int]:
    """The tensor infos (absolute offsets, data checked to lie in the file), data offset."""
    raw: dict[str, tuple] = {}
    for index in range(n_tensors):
        entry = _read_tensor_info(cur, index, alignment)
        if entry[0] in raw:
            cur.fail(f"duplicate tensor name {_show(entry[0])}")
        raw[entry[0]] = entry
    data_offset = -(-cur.pos // alignment) * alignment  # header end rounded up
    tensors: dict[str, TensorInfo] = {}
    for name, ggml_type, shape, rel_offset, nbytes in raw.values():
        start = data_offset + rel_offset
        if start + nbytes > cur.end:
            cur.fail(
                f"tensor {_show(name)} data [offset {start}, size {nbytes}] extends past "
                f"the end of the file (size {cur.end})"
            )
        tensors[name] = TensorInfo(name, ggml_type, tuple(shape), start, nbytes)
    return tensors, data_offset


def _read_version(cur: _Cursor) -> int:
    magic = cur.u32("magic")
    if magic != gguf.GGUF_MAGIC:
        cur.fail(f"not a GGUF file: bad magic {_show(bytes(cur.buf[0:4]))}")
    version = cur.u32("version")
    if version in SUPPORTED_VERSIONS:
        return version
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if swapped in SUPPORTED_VERSIONS:
        cur.fail(f"big-endian GGUF (version {swapped}) is not supported")
    cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")


def parse_gguf(buf: Any, source: str | None = None) -> GGUFHeader:
    """Parse and validate a GGUF header from a buffer holding the WHOLE file.

    `source` (e.g. the file path) prefixes every error message. Raises `GGUFError`.
    """
    with memoryview(buf) as view:
        mv = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        try:
            src = buf if isinstance(buf, (bytes, bytearray, mmap.mmap)) else _BytesSlicer(mv)
            return _parse(_Cursor(mv, src, source))
        finally:
            if mv is not view:
                mv.release()


def _parse(cur: _Cursor) -> GGUFHeader:
    version = _read_version(cur)
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    cur.count(n_tensors, "tensor count", _MIN_TENSOR_INFO_BYTES, MAX_TENSORS)
    cur.count(n_kv, "metadata count", _MIN_KV_BYTES, MAX_KV)
    metadata, types = _read_metadata(cur, n_kv)
    cur.count(n_tensors, "tensor count", _MIN_TENSOR_INFO_BYTES, MAX_TENSORS)  # now exact
    alignment = _alignment(cur, metadata, types)
    tensors, data_offset = _read_tensors(cur, n_tensors, alignment)
    return GGUFHeader(version, metadata, types, tensors, alignment, data_offset)
