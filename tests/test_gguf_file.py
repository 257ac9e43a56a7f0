"""GGUFFile / parse_gguf on the real models (checked against gguf-py's GGUFReader) and on a
small synthetic file written with gguf.GGUFWriter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from loaders.gguf_arrays import GGUFArray
from loaders.gguf_file import GGUFFile
from loaders.gguf_parse import parse_gguf
from quant.errors import GGUFError, TandemError

REPO = Path(__file__).resolve().parent.parent
QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_path)


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path):
    with GGUFFile(smollm2_path) as f:
        yield f


def test_smollm2_metadata_matches_gguf_reader(smollm2: GGUFFile, smollm2_reader) -> None:
    expected = {
        k: f.contents() for k, f in smollm2_reader.fields.items() if not k.startswith("GGUF.")
    }
    assert list(smollm2.metadata) == list(expected)
    for key, value in expected.items():
        got = smollm2.metadata[key]
        assert got == value, key
        if isinstance(value, list):  # arrays are compact GGUFArrays; tolist() is the list
            assert isinstance(got, GGUFArray) and got.tolist() == value, key
            assert {type(v) for v in got.tolist()} == {type(v) for v in value}, key
        else:
            assert type(got) is type(value), key
    assert smollm2.version == 3
    assert smollm2.metadata["general.architecture"] == "llama"
    assert len(smollm2.metadata["tokenizer.ggml.tokens"]) == 49152


def test_smollm2_tensors_match_gguf_reader(smollm2: GGUFFile, smollm2_reader) -> None:
    assert len(smollm2.tensors) == len(smollm2_reader.tensors) == 272
    assert list(smollm2.tensors) == [t.name for t in smollm2_reader.tensors]  # file order
    for ref in smollm2_reader.tensors:
        info = smollm2.tensors[ref.name]
        assert info.ggml_type == int(ref.tensor_type), ref.name
        assert info.shape == tuple(int(d) for d in ref.shape), ref.name
        assert info.offset == ref.data_offset, ref.name
        assert info.nbytes == ref.n_bytes, ref.name
    assert smollm2.data_offset == smollm2_reader.data_offset
    assert smollm2.alignment == smollm2_reader.alignment
    assert smollm2.file_size == smollm2.path.stat().st_size


@pytest.mark.parametrize("pick", [0, 1, -1])
def test_smollm2_tensor_views_equal_gguf_reader_bytes(
    smollm2: GGUFFile, smollm2_reader, pick: int
) -> None:
    ref = smollm2_reader.tensors[pick]
    info = smollm2.tensors[ref.name]
    view = smollm2.tensor(ref.name)
    assert view.dtype == torch.uint8
    assert tuple(view.shape) == (info.n_rows, info.row_bytes)
    assert info.n_rows * info.row_bytes == info.nbytes
    flat = smollm2.tensor_bytes(ref.name)
    assert flat.shape == (info.nbytes,)
    assert flat.numpy().tobytes() == np.ascontiguousarray(ref.data).tobytes()
    assert view.data_ptr() == flat.data_ptr()  # both views of the mapping, no copy


def test_gemma3_known_facts_and_fast_open(gemma3_path: Path) -> None:
    start = time.perf_counter()
    with GGUFFile(gemma3_path) as f:
        elapsed = time.perf_counter() - start
        assert f.metadata["general.architecture"] == "gemma3"
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 262144
        assert len(f.metadata["tokenizer.ggml.scores"]) == 262144
        assert len(f.metadata["tokenizer.ggml.token_type"]) == 262144
        assert len(f.tensors) == 236
        info = f.tensors["token_embd.weight"]
        assert info.shape == (640, 262144)
        assert f.tensor("token_embd.weight").shape == (262144, info.row_bytes)
    assert elapsed < 2.0, f"opening Gemma3 took {elapsed:.2f} s"


def test_unknown_tensor_name_is_a_tandem_error(smollm2: GGUFFile) -> None:
    with pytest.raises(TandemError, match="no tensor named 'nope'"):
        smollm2.tensor("nope")
    with pytest.raises(GGUFError, match="no tensor named"):
        smollm2.tensor_bytes("nope")


def test_views_emit_no_warning(smollm2: GGUFFile) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smollm2.tensor_bytes("output_norm.weight")


def test_missing_or_empty_file_is_a_gguf_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "missing.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        GGUFFile(tmp_path / "empty.gguf")


def test_views_outlive_close(smollm2_path: Path) -> None:
    # run in a child: a regression here is a segfault, which must not kill the test session
    code = textwrap.dedent(f"""
        import gc
        from loaders.gguf_file import GGUFFile
        f = GGUFFile({str(smollm2_path)!r})
        v = f.tensor("output_norm.weight")
        before = bytes(v.numpy())
        f.close()
        assert f.closed
        del f
        gc.collect()
        assert bytes(v.numpy()) == before
        print("ok")
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_closed_file_refuses_reads(smollm2_path: Path) -> None:
    f = GGUFFile(smollm2_path)
    f.close()
    with pytest.raises(GGUFError, match="closed"):
        f.tensor("output_norm.weight")


def _write_synthetic(path: Path) -> tuple[np.ndarray, np.ndarray]:
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 0.125)
    w.add_float64("t.f64", 1e300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.strs", ["a", "", "ü", "<0x0A>"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])
    f32 = np.arange(12, dtype=np.float32).reshape(3, 4)
    q8 = np.random.default_rng(0).integers(0, 256, size=(2, 2 * 34), dtype=np.uint8)
    w.add_tensor("f32", f32)
    w.add_tensor("q8", q8, raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f32, q8


def test_synthetic_gguf_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "synthetic.gguf"
    f32, q8 = _write_synthetic(path)
    with GGUFFile(path) as f:
        m = f.metadata
        assert m["general.architecture"] == "llama"
        assert (m["t.u8"], m["t.i16"], m["t.u32"], m["t.i64"]) == (
            200,
            -300,
            4_000_000_000,
            -(2**62),
        )
        assert (m["t.f32"], m["t.f64"], m["t.bool"], m["t.str"]) == (0.125, 1e300, True, "héllo ✓")
        assert m["t.strs"] == ["a", "", "ü", "<0x0A>"]
        assert m["t.ints"] == [1, -2, 3] and m["t.floats"] == [0.5, -1.25]
        assert m["t.bools"] == [True, False, True] and m["t.nested"] == [[1, 2], [3]]
        assert f.metadata_types["t.nested"] == gguf.GGUFValueType.ARRAY
        assert list(f.tensors) == ["f32", "q8"]
        a, b = f.tensors["f32"], f.tensors["q8"]
        assert (a.ggml_type, a.shape, a.nbytes) == (QT.F32, (4, 3), 48)
        assert (b.ggml_type, b.shape, b.nbytes) == (QT.Q8_0, (64, 2), 136)
        assert a.offset % f.alignment == 0 and b.offset % f.alignment == 0
        assert a.offset >= f.data_offset and f.data_offset % f.alignment == 0
        got = f.tensor("f32").numpy().view(np.float32).reshape(3, 4)
        assert np.array_equal(got, f32)
        assert np.array_equal(f.tensor("q8").numpy(), q8)
    header = parse_gguf(path.read_bytes())
    assert header.tensors == f.tensors and header.metadata == f.metadata
    assert parse_gguf(memoryview(path.read_bytes())).tensors == f.tensors
