"""Quantization of float32 rows into GGML blocks (Q4_0, Q4_1, Q8_0; F32/F16/BF16 trivially).

The quantizers follow ggml's reference ones (quantize_row_*_ref in ggml-quants.c, mirrored
by gguf-py's quants.py) operation for operation in float32, so for finite input the bytes
equal `gguf.quants.quantize` exactly (BF16: except NaN payloads). Like the reference, a
block whose scale is so small (subnormal) that 1/d overflows quantizes to garbage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as T

from quant.errors import UnsupportedError
from quant.formats import block_format

# A quantizer takes blocks (n, block_size) float32 and returns (n, type_size) uint8.
Quantizer = Callable[[torch.Tensor], torch.Tensor]
QUANTIZERS: dict[int, Quantizer] = {}


def _register(qtype: T) -> Callable[[Quantizer], Quantizer]:
    def wrap(fn: Quantizer) -> Quantizer:
        QUANTIZERS[int(qtype)] = fn
        return fn

    return wrap


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (an all-zero block), as the reference's `d ? 1/d : 0`."""
    return torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 → (n, 2) uint8: the value rounded to fp16 (nearest even)."""
    return v.to(torch.float16).view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) uint8 in 0..15 → (n, 16): byte j holds q[j] (low) and q[j+16] (high)."""
    return q[:, :16] | (q[:, 16:] << 4)


def _trunc_u8(v: torch.Tensor, top: int) -> torch.Tensor:
    """The C cast `(uint8_t)v` of the reference, for v in [0, top + 1.5): trunc, clamp."""
    return v.trunc_().clamp_(0, top).to(torch.uint8)


@_register(T.F32)
def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.clone().view(torch.uint8)  # (n, 4)


@_register(T.F16)
def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.to(torch.float16).view(torch.uint8)  # (n, 2)


@_register(T.BF16)
def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.to(torch.bfloat16).view(torch.uint8)  # (n, 2); round to nearest even


@_register(T.Q4_0)
def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # d = the value of largest magnitude / -8 (so it maps to -8); q = trunc(x/d + 8.5) ≤ 15
    imax = blocks.abs().argmax(dim=1, keepdim=True)  # first maximum, as the reference
    d = blocks.gather(1, imax) / -8  # (n, 1)
    q = _trunc_u8(blocks * _inverse(d) + 8.5, 15)  # (n, 32) in 0..15
    return torch.cat((_f16_bytes(d), _pack_nibbles(q)), dim=1)  # (n, 18)


@_register(T.Q4_1)
def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # d = (max - min) / 15, m = min; q = trunc((x - min)/d + 0.5) ≤ 15
    lo = blocks.amin(dim=1, keepdim=True)  # (n, 1)
    d = (blocks.amax(dim=1, keepdim=True) - lo) / 15
    q = _trunc_u8((blocks - lo) * _inverse(d) + 0.5, 15)  # (n, 32) in 0..15
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)), dim=1)  # (n, 20)


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf (halves away from zero), computed as gguf-py does: no x + 0.5 rounding slip."""
    a = v.abs()
    whole = a.floor()
    return whole.add_((a.sub_(whole) * 2).floor_()).mul_(v.sign())


@_register(T.Q8_0)
def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # d = max|x| / 127; q = roundf(x / d) in -127..127
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # (n, 1)
    q = _round_away(blocks * _inverse(d)).to(torch.int8)  # (n, 32)
    return torch.cat((_f16_bytes(d), q.view(torch.uint8)), dim=1)  # (n, 34)


def quantize(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Pack float rows into GGML blocks: (..., K) → uint8 (..., K // block_size * type_size).

    K must be a whole number of blocks (32 elements for Q4_0/Q4_1/Q8_0).
    """
    fmt = block_format(ggml_type)
    fn = QUANTIZERS.get(fmt.ggml_type)
    if fn is None:
        supported = ", ".join(block_format(t).name for t in QUANTIZERS)
        raise UnsupportedError(f"cannot quantize to {fmt.name}; quantize supports: {supported}")
    if x.dim() == 0:
        raise ValueError("quantize wants rows (..., K), got a scalar")
    *lead, k = x.shape
    row = fmt.row_bytes(k)  # raises UnsupportedError unless K is a whole number of blocks
    blocks = x.to(torch.float32).contiguous().view(-1, fmt.block_size)  # (n, block_size)
    return fn(blocks).view(*lead, row)
