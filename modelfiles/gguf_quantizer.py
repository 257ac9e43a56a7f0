"""Quantizing a float GGUF file (F32/F16/BF16 weights) to Q4_0, Q4_1 or Q8_0, for
`tandem create --quantize`.

What gets quantized follows llama.cpp's llama-quant.cpp for these types: weight matrices
(2-D or more) whose rows are whole 32-element blocks; 1-D tensors (norms, biases) keep their
type, as do the MoE router (ffn_gate_inp) and position embeddings; token_embd is quantized
like the rest. Tensors already in a quantized type are copied unchanged. Every metadata key is
copied with its type, and general.file_type is set to the new llama.cpp file type.

One tensor is in memory at a time (float32 rows → quant.quantize → written), so a model far
larger than RAM quantizes too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as VT

from loaders.gguf_file import GGUFFile, TensorInfo
from quant.dequant import dequantize
from quant.errors import UnsupportedError
from quant.formats import type_name
from quant.quantize import quantize

TARGETS: dict[str, T] = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0}
_FILE_TYPES = {
    T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
_FLOATS = (T.F32, T.F16, T.BF16)
_KEEP = ("_norm", "ffn_gate_inp", "pos_embd")  # name parts llama.cpp leaves unquantized
_SET_BY_WRITER = ("general.architecture", "general.alignment", "general.file_type")

Progress = Callable[[str], None]


def target_type(name: str) -> T:
    """The GGML type for a --quantize name (q4_0, q4_1, q8_0; any case)."""
    qtype = TARGETS.get(name.lower())
    if qtype is None:
        raise UnsupportedError(f"cannot quantize to {name!r}; choose one of {', '.join(TARGETS)}")
    return qtype


def quantizes(info: TensorInfo) -> bool:
    return (
        info.ggml_type in _FLOATS
        and len(info.shape) >= 2
        and info.shape[0] % 32 == 0
        and not any(part in info.name for part in _KEEP)
    )


def quantize_gguf(src: Path, dst: Path, target: str, progress: Progress | None = None) -> str:
    """Write `src` quantized to `target` at `dst`; returns a one-line summary."""
    qtype = target_type(target)
    source = GGUFFile(src)
    chosen = {info.name for info in source.tensors.values() if quantizes(info)}
    if not chosen:
        kinds = sorted({type_name(i.ggml_type) for i in source.tensors.values()})
        raise UnsupportedError(
            f"{src.name} has no F32/F16/BF16 weight matrices to quantize "
            f"(its tensors are {', '.join(kinds)}); --quantize needs an "
            "unquantized GGUF"
        )
    writer = gguf.GGUFWriter(str(dst), source.metadata["general.architecture"])
    if source.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        writer.add_custom_alignment(source.alignment)
    _copy_metadata(src, source, writer)
    writer.add_file_type(int(_FILE_TYPES[qtype]))
    for info in source.tensors.values():
        out = qtype if info.name in chosen else info.ggml_type
        nbytes = info.n_rows * _row_bytes(out, info.shape[0])
        # the shape in elements, outermost first (a non-uint8 dtype keeps gguf-py from
        # reading it as a shape in bytes)
        writer.add_tensor_info(
            info.name, list(reversed(info.shape)), np.dtype(np.float32), nbytes, raw_dtype=T(out)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for n, info in enumerate(source.tensors.values(), 1):
        writer.write_tensor_data(
            _tensor_bytes(source, info, qtype if info.name in chosen else None)
        )
        if progress and info.name in chosen:
            progress(f"quantizing {info.name} [{n}/{len(source.tensors)}]")
    writer.close()
    before = sorted({type_name(source.tensors[name].ggml_type) for name in chosen})
    return (
        f"quantized {len(chosen)} of {len(source.tensors)} tensors from "
        f"{'/'.join(before)} to {qtype.name}"
    )


def _row_bytes(ggml_type: int, n: int) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[T(ggml_type)]
    return n // block_size * type_size


def _tensor_bytes(source: GGUFFile, info: TensorInfo, qtype: T | None) -> np.ndarray:
    if qtype is None:
        return source.tensor_bytes(info.name).numpy()
    rows = dequantize(source.tensor(info.name), info.ggml_type)  # (n_rows, ne0) float32
    return quantize(rows, int(qtype)).numpy()  # (n_rows, row_bytes) uint8


def _copy_metadata(src: Path, source: GGUFFile, writer: gguf.GGUFWriter) -> None:
    """Every key with its exact type (array item types come from gguf-py's reader)."""
    fields = gguf.GGUFReader(src).fields
    for key, value in source.metadata.items():
        if key in _SET_BY_WRITER:
            continue
        types = fields[key].types
        if types[0] == VT.ARRAY:
            if len(types) != 2:
                raise UnsupportedError(
                    f"{src.name}: metadata {key!r} is a nested array, which "
                    "quantizing does not copy"
                )
            if not value:
                continue  # gguf-py cannot write an empty array
            writer.add_key_value(key, value, VT.ARRAY, sub_type=types[1])
        else:
            writer.add_key_value(key, value, types[0])
