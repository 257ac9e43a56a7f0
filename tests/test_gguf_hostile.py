"""Hostile and corrupt GGUF files: each must raise GGUFError quickly, with little memory and a
message naming the problem. Plus a bounded-time hypothesis fuzz of the real SmolLM2 header."""

from __future__ import annotations

import re
import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders.gguf_arrays import NumericArray, StringArray
from loaders.gguf_file import GGUFFile
from loaders.gguf_parse import parse_gguf
from quant.errors import GGUFError

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType
PEAK_LIMIT = 16 << 20
TIME_LIMIT = 1.0


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_str(key: str, value: str) -> bytes:
    return kv(key, VT.STRING, gstr(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, VT.UINT32, u32(value))


def ti(
    name: str | bytes,
    shape: tuple[int, ...],
    ggml_type: int,
    offset: int,
    n_dims: int | None = None,
) -> bytes:
    dims = b"".join(u64(d) for d in shape)
    return (
        gstr(name)
        + u32(len(shape) if n_dims is None else n_dims)
        + dims
        + u32(ggml_type)
        + u64(offset)
    )


BASE_KVS = [
    kv_str("general.architecture", "llama"),
    kv_u32("test.n", 7),
    kv("test.words", VT.ARRAY, u32(VT.STRING) + u64(2) + gstr("a") + gstr("bc")),
]
BASE_TIS = [ti("a", (8,), QT.F32, 0), ti("b", (32, 2), QT.Q8_0, 32)]
BASE_DATA = bytes(range(100))  # 32 bytes of "a", 68 of "b"


def build(
    kvs: list[bytes] | None = None,
    tis: list[bytes] | None = None,
    data: bytes = BASE_DATA,
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
) -> bytes:
    kvs = BASE_KVS if kvs is None else kvs
    tis = BASE_TIS if tis is None else tis
    head = (
        magic
        + u32(version)
        + u64(len(tis) if n_tensors is None else n_tensors)
        + u64(len(kvs) if n_kv is None else n_kv)
        + b"".join(kvs)
        + b"".join(tis)
    )
    return head + b"\0" * (-len(head) % alignment) + data


GOOD = build()
KV_START = 24
TI_START = KV_START + len(b"".join(BASE_KVS))
TI_END = TI_START + len(b"".join(BASE_TIS))
DATA_START = len(GOOD) - len(BASE_DATA)


def nested(depth: int) -> bytes:
    """An array of arrays of ... (`depth` levels) holding one uint8."""
    return (u32(VT.ARRAY) + u64(1)) * (depth - 1) + u32(VT.UINT8) + u64(1) + b"\x01"


def with_kv(extra: bytes) -> bytes:
    return build(BASE_KVS + [extra])


def with_ti(extra: bytes) -> bytes:
    return build(tis=BASE_TIS + [extra])


CASES: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "truncated"),
    "truncated-in-header": (
        GOOD[:10],
        "truncated: tensor count at offset 8 needs 8 bytes but only 2 remain",
    ),
    "truncated-in-counts": (GOOD[:20], "truncated: metadata count"),
    "truncated-in-kv": (GOOD[: KV_START + 80], "truncated: metadata key #2 at offset"),
    "truncated-in-string-array": (
        GOOD[: TI_START - 3],
        r"truncated: value of key 'test.words'\[1\] length",
    ),
    "truncated-in-tensor-info": (GOOD[: TI_END - 5], "truncated: tensor 'b' data offset at offset"),
    "truncated-counts-cannot-fit": (
        GOOD[: KV_START + 30],
        "tensor count 2 cannot fit in the 30 bytes",
    ),
    "truncated-tensor-infos-cannot-fit": (
        GOOD[: TI_START + 20],
        "tensor count 2 cannot fit in the 20 bytes",
    ),
    "truncated-in-data": (
        GOOD[: DATA_START + 50],
        r"tensor 'b' data \[offset \d+, size 68\] extends past the end of the file \(size",
    ),
    "wrong-magic": (b"GGML" + GOOD[4:], "bad magic"),
    "version-1": (build(version=1), "unsupported GGUF version 1 "),
    "version-99": (build(version=99), "unsupported GGUF version 99 "),
    "big-endian": (build(version=3 << 24), "big-endian"),
    "huge-n-kv": (build(n_kv=2**63), "metadata count 9223372036854775808 exceeds the limit"),
    "n-kv-past-end": (build(n_kv=1000), "metadata count 1000 cannot fit"),
    "huge-n-tensors": (build(n_tensors=2**64 - 1), "tensor count 18446744073709551615 exceeds"),
    "n-tensors-past-end": (build(n_tensors=100), "tensor count 100 cannot fit"),
    "huge-key-length": (
        build([u64(2**63) + b"k" + u32(VT.UINT8) + b"\0"]),
        "key #0 length 9223372036854775808 exceeds",
    ),
    "huge-string-value": (
        with_kv(kv("s", VT.STRING, u64(2**64 - 1) + b"x")),
        "value of key 's' length 18446744073709551615 exceeds",
    ),
    "string-past-end": (
        with_kv(kv("s", VT.STRING, u64(5000) + b"x")),
        "truncated: value of key 's'",
    ),
    "huge-array-count": (
        with_kv(kv("a", VT.ARRAY, u32(VT.UINT8) + u64(2**62))),
        "item count 4611686018427387904 exceeds the limit of 16777216",
    ),
    "array-count-past-end": (
        with_kv(kv("a", VT.ARRAY, u32(VT.UINT32) + u64(10**6))),
        "item count 1000000 cannot fit",
    ),
    "huge-string-array": (
        with_kv(kv("a", VT.ARRAY, u32(VT.STRING) + u64(2**40))),
        "item count 1099511627776 exceeds",
    ),
    "string-array-element-huge": (
        with_kv(kv("a", VT.ARRAY, u32(VT.STRING) + u64(2) + gstr("x") + u64(2**63))),
        r"value of key 'a'\[1\] length 9223372036854775808 exceeds",
    ),
    "nested-1000-deep": (with_kv(kv("deep", VT.ARRAY, nested(1000))), "nested deeper than 3"),
    "nested-4-deep": (with_kv(kv("deep", VT.ARRAY, nested(4))), "nested deeper than 3"),
    "unknown-value-type": (with_kv(kv("x", 13, b"\0" * 8)), "key 'x' has unknown value type 13"),
    "unknown-value-type-max": (
        with_kv(kv("x", 2**32 - 1, b"\0" * 8)),
        "unknown value type 4294967295",
    ),
    "unknown-array-item-type": (
        with_kv(kv("x", VT.ARRAY, u32(77) + u64(1) + b"\0")),
        "unknown array item type 77",
    ),
    "unknown-ggml-type-removed": (
        with_ti(ti("c", (32,), 4, 128)),
        "tensor 'c' has unknown ggml type 4",
    ),
    "unknown-ggml-type-huge": (
        with_ti(ti("c", (32,), 2**32 - 1, 128)),
        "unknown ggml type 4294967295",
    ),
    "tensor-offset-past-end": (
        with_ti(ti("c", (8,), QT.F32, 1 << 40)),
        r"tensor 'c' data \[offset \d+, size 32\] extends past the end",
    ),
    "tensor-offset-max": (with_ti(ti("c", (8,), QT.F32, 2**64 - 32)), "extends past the end"),
    "misaligned-tensor-offset": (
        with_ti(ti("c", (8,), QT.F32, 129)),
        "data offset 129 is not a multiple of the alignment 32",
    ),
    "element-count-overflow": (
        with_ti(ti("c", (2**32, 2**32, 2**32, 2**32), QT.F32, 128)),
        "element count overflows 64 bits",
    ),
    "element-count-overflow-2d": (
        with_ti(ti("c", (2**63, 2), QT.F32, 128)),
        "element count overflows 64 bits",
    ),
    "huge-but-representable": (
        with_ti(ti("c", (2**40, 2**20), QT.F32, 128)),
        "extends past the end",
    ),
    "shape-not-block-multiple": (
        with_ti(ti("c", (33, 2), QT.Q8_0, 128)),
        "row length 33 is not a multiple of the Q8_0 block size 32",
    ),
    "zero-dimension": (with_ti(ti("c", (8, 0), QT.F32, 128)), "zero dimension"),
    "n-dims-0": (with_ti(ti("c", (), QT.F32, 128)), "has 0 dimensions"),
    "n-dims-9": (with_ti(ti("c", (1,) * 9, QT.F32, 128)), "has 9 dimensions"),
    "n-dims-huge": (
        with_ti(ti("c", (8,), QT.F32, 128, n_dims=2**32 - 1)),
        "has 4294967295 dimensions",
    ),
    "alignment-0": (
        with_kv(kv_u32("general.alignment", 0)),
        "general.alignment 0 is not a non-zero power of two",
    ),
    "alignment-3": (
        with_kv(kv_u32("general.alignment", 3)),
        "general.alignment 3 is not a non-zero power of two",
    ),
    "alignment-u64": (
        with_kv(kv("general.alignment", VT.UINT64, u64(32))),
        "general.alignment must be a uint32, not UINT64",
    ),
    "alignment-string": (
        with_kv(kv_str("general.alignment", "32")),
        "must be a uint32, not STRING",
    ),
    "duplicate-key": (with_kv(kv_u32("test.n", 8)), "duplicate metadata key 'test.n'"),
    "duplicate-tensor-name": (with_ti(ti("a", (8,), QT.F32, 128)), "duplicate tensor name 'a'"),
    "invalid-utf8-key": (
        with_kv(kv(b"bad\xff\xfekey", VT.UINT8, b"\0")),
        "key #3 at offset \\d+ is not valid UTF-8",
    ),
    "empty-key": (with_kv(kv(b"", VT.UINT8, b"\0")), "key #3 at offset \\d+ is empty"),
    "invalid-utf8-string-array": (
        with_kv(kv("a", VT.ARRAY, u32(VT.STRING) + u64(2) + gstr("ok") + gstr(b"\xc3("))),
        r"value of key 'a'\[1\] at offset \d+ is not valid UTF-8",
    ),
    "invalid-utf8-tensor-name": (
        with_ti(ti(b"\xff", (8,), QT.F32, 128)),
        "tensor #2 name at offset \\d+ is not valid UTF-8",
    ),
    "empty-tensor-name": (
        with_ti(ti(b"", (8,), QT.F32, 128)),
        "tensor #2 at offset \\d+ has an empty name",
    ),
    "too-many-inner-arrays": (
        with_kv(kv("n", VT.ARRAY, u32(VT.ARRAY) + u64(5000) + (u32(VT.UINT8) + u64(0)) * 5000)),
        "value of key 'n': more than 4096 arrays nested in arrays",
    ),
    "n-kv-over-cap": (build(n_kv=(1 << 16) + 1), "metadata count 65537 exceeds the limit of 65536"),
    "n-tensors-over-cap": (
        build(n_tensors=(1 << 16) + 1),
        "tensor count 65537 exceeds the limit of 65536",
    ),
    "all-ones-after-magic": (b"GGUF" + b"\xff" * 200, "unsupported GGUF version 4294967295"),
    "all-ones-counts": (
        b"GGUF" + u32(3) + b"\xff" * 200,
        "tensor count 18446744073709551615 exceeds",
    ),
}


def _parse_measured(data: bytes) -> tuple[GGUFError | None, float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        parse_gguf(data, source="hostile.gguf")
        error = None
    except GGUFError as e:
        error = e
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, elapsed, peak


def test_base_file_is_valid() -> None:
    header = parse_gguf(GOOD)
    assert header.metadata == {
        "general.architecture": "llama",
        "test.n": 7,
        "test.words": ["a", "bc"],
    }
    assert [(t.name, t.shape, t.nbytes) for t in header.tensors.values()] == [
        ("a", (8,), 32),
        ("b", (32, 2), 68),
    ]
    assert header.data_offset == DATA_START
    deep = parse_gguf(with_kv(kv("deep", VT.ARRAY, nested(3)))).metadata["deep"]
    assert deep == [[[1]]] and isinstance(deep[0][0], NumericArray)
    aligned = build(
        BASE_KVS + [kv_u32("general.alignment", 64)],
        [ti("a", (8,), QT.F32, 0), ti("b", (32, 2), QT.Q8_0, 64)],
        bytes(132),
        alignment=64,
    )
    header = parse_gguf(aligned)
    assert header.alignment == 64 and header.data_offset % 64 == 0
    assert header.tensors["b"].offset == header.data_offset + 64


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_raises_gguf_error(case: str, tmp_path: Path) -> None:
    data, pattern = CASES[case]
    error, elapsed, peak = _parse_measured(data)
    assert error is not None, f"{case}: parsed without error"
    message = str(error)
    assert message.startswith("hostile.gguf: ") and "\n" not in message
    assert re.search(pattern, message), message
    assert elapsed < TIME_LIMIT, f"{case}: took {elapsed:.3f} s"
    assert peak < PEAK_LIMIT, f"{case}: traced peak {peak} bytes"
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError, match="empty" if not data else pattern) as info:
        GGUFFile(path)
    assert str(info.value).startswith(f"{path}: ")


# ---------------------------------------------------------------- fuzzing the real header

EXTREMES = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    2**63 - 1,
    2**63,
    2**64 - 1,
]
FUZZ_BUDGET_S = 15.0


@pytest.fixture(scope="module")
def smollm2_image(smollm2_path: Path) -> tuple[bytearray, int, int]:
    """The whole file in memory, its header end, and where its tensor infos start."""
    buf = bytearray(smollm2_path.read_bytes())
    header = parse_gguf(buf)
    first = next(iter(header.tensors))
    ti_start = buf.find(gstr(first) + u32(len(header.tensors[first].shape)))
    assert 0 < ti_start < header.data_offset
    return buf, header.data_offset, ti_start


@st.composite
def mutations(draw, header_end: int, ti_start: int) -> tuple[list[tuple], int | None]:
    where = st.one_of(
        st.integers(0, 600), st.integers(0, header_end - 1), st.integers(ti_start, header_end - 1)
    )
    edit = st.one_of(
        st.tuples(st.just("flip"), where, st.integers(0, 7)),
        st.tuples(st.just("set"), where, st.sampled_from(EXTREMES), st.sampled_from([1, 2, 4, 8])),
    )
    edits = draw(st.lists(edit, min_size=1, max_size=4))
    cut = draw(st.one_of(st.none(), st.integers(0, header_end)))
    return edits, cut


def _apply(buf: bytearray, edits: list[tuple]) -> None:
    for edit in edits:
        if edit[0] == "flip":
            buf[edit[1]] ^= 1 << edit[2]
        else:
            _, pos, value, width = edit
            buf[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def test_fuzz_real_header(smollm2_image: tuple[bytearray, int, int]) -> None:
    buf, header_end, ti_start = smollm2_image
    deadline = time.monotonic() + FUZZ_BUDGET_S

    @settings(
        max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(mutations(header_end, ti_start))
    def run(case: tuple[list[tuple], int | None]) -> None:
        if time.monotonic() > deadline:
            return  # wall-clock guard: the remaining examples do nothing
        edits, cut = case
        saved = bytes(buf[: header_end + 16])
        try:
            _apply(buf, edits)
            data = buf if cut is None else bytes(buf[:cut])
            start = time.perf_counter()
            try:
                parse_gguf(data)
            except GGUFError as e:
                assert "\n" not in str(e)
            assert time.perf_counter() - start < TIME_LIMIT
        finally:
            buf[: header_end + 16] = saved

    run()


def test_arrays_are_compact_read_only_sequences_of_plain_values() -> None:
    """Arrays parse into GGUFArrays (issue 13: lists cost 8-36 bytes per 1-4 byte item): the
    items are plain Python values, nothing refers to the parsed buffer, nothing is writable."""
    words = ["a", "", "ü", "<0x0A>", "héllo ✓"]
    raw = b"".join(gstr(w) for w in words)
    buf = bytearray(
        build(
            BASE_KVS
            + [
                kv("w", VT.ARRAY, u32(VT.STRING) + u64(len(words)) + raw),
                kv("i", VT.ARRAY, u32(VT.INT32) + u64(3) + struct.pack("<3i", 1, -2, 3)),
                kv("f", VT.ARRAY, u32(VT.FLOAT32) + u64(2) + struct.pack("<2f", 0.5, -1.25)),
                kv("b", VT.ARRAY, u32(VT.BOOL) + u64(3) + b"\x01\x00\x07"),
                kv("e", VT.ARRAY, u32(VT.UINT64) + u64(0)),
            ]
        )
    )
    md = parse_gguf(buf).metadata
    w, i, f, b, e = (md[k] for k in "wifbe")
    buf[:] = bytes(len(buf))  # the parsed values do not read the buffer
    assert isinstance(w, StringArray) and w == words and w.tolist() == words
    assert len(w) == 5 and w[2] == "ü" and w[-1] == "héllo ✓" and w[1:3] == ["", "ü"]
    assert list(w) == words and w != words[:4] and w != "a"
    with pytest.raises(IndexError):
        w[5]
    assert w.nbytes == len(raw) + 8 * (len(words) + 1)
    assert i == [1, -2, 3] and [type(x) for x in i] == [int] * 3 and i[-1] == 3
    assert f == [0.5, -1.25] and type(f[0]) is float
    assert b == [True, False, True] and type(b[2]) is bool
    assert e == [] and not e and len(e) == 0
    assert i[1:] == [-2, 3] and isinstance(i[1:], NumericArray)
    with pytest.raises(ValueError):
        i.values[0] = 5  # read-only
    with pytest.raises(TypeError):
        hash(w)
