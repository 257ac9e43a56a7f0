"""The GGML tensor formats tandem can read: block geometry (elements and bytes per block).

Every size comes from gguf-py (`gguf.GGML_QUANT_SIZES`), the same table llama.cpp's
ggml-common.h defines, so a GGUF row of `n` elements of a type occupies exactly
`n // block_size * type_size` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quant.errors import UnsupportedError


@dataclass(frozen=True)
class BlockFormat:
    """One GGML tensor type: `block_size` elements are packed into `type_size` bytes."""

    name: str  # "Q4_0", ...
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_size: int  # elements per block (1 for F32/F16/BF16, 32 for Q4_0.., 256 for K-quants)
    type_size: int  # bytes per block

    def row_bytes(self, n_elements: int) -> int:
        """Bytes taken by a row of `n_elements`; it must be a whole number of blocks."""
        if n_elements < 0 or n_elements % self.block_size != 0:
            raise UnsupportedError(
                f"a {self.name} row of {n_elements} elements is not a whole number of "
                f"{self.block_size}-element blocks"
            )
        return n_elements // self.block_size * self.type_size


_SUPPORTED = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
    "MXFP4",  # gpt-oss experts (quant/mxfp4.py)
)


def _make(name: str) -> BlockFormat:
    qtype = GGMLQuantizationType[name]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return BlockFormat(name, int(qtype), block_size, type_size)


FORMATS: dict[int, BlockFormat] = {f.ggml_type: f for f in map(_make, _SUPPORTED)}


def type_name(ggml_type: int) -> str:
    """The GGML name of a type number ("IQ2_XXS"), or "type <n>" for one gguf-py lacks."""
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def block_format(ggml_type: int) -> BlockFormat:
    """The BlockFormat of `ggml_type`; UnsupportedError naming it if tandem cannot read it."""
    fmt = FORMATS.get(int(ggml_type))
    if fmt is None:
        supported = ", ".join(f.name for f in FORMATS.values())
        raise UnsupportedError(
            f"tensor type {type_name(ggml_type)} is not supported; supported types: {supported}"
            " (re-quantize the model to one of these, e.g. Q4_K_M or Q8_0)"
        )
    return fmt
