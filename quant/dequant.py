"""Dequantization of GGML block formats to float32, bit-exact with gguf-py's reference.

One function per type unpacks a chunk of blocks with vectorized torch ops, registered by
type in DEQUANTIZERS; `dequantize` validates, chunks and dispatches. It runs on every token
(weights are dequantized chunk by chunk), so it avoids byte-granular strided ops. A fresh
float32 result costs page faults that can exceed the unpacking itself: callers on a hot path
pass `out=`. Measured rates per type: docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from gguf import GGMLQuantizationType as T

from quant.formats import BlockFormat, block_format
from quant.mxfp4 import dequantize_mxfp4

# A dequantizer unpacks blocks (n, type_size) uint8 into out (n, block_size) float32.
Dequantizer = Callable[[torch.Tensor, torch.Tensor], None]
DEQUANTIZERS: dict[int, Dequantizer] = {}
# Blocks are unpacked this many elements at a time, so the uint8 temporaries stay small and
# in cache (fresh large allocations cost page faults that dwarf the arithmetic).
CHUNK_ELEMENTS = 1 << 20


def _register(*qtypes: T) -> Callable[[Dequantizer], Dequantizer]:
    def wrap(fn: Dequantizer) -> Dequantizer:
        for qtype in qtypes:
            DEQUANTIZERS[int(qtype)] = fn
        return fn

    return wrap


@cache
def _const(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant vector (shift amounts), cached per dtype and device."""
    return torch.tensor(values, dtype=dtype, device=device)


def _rep(byte: int, dtype: torch.dtype) -> int:
    """`byte` repeated in every byte of an integer of `dtype` (0x0F → 0x0F0F0F0F for int32)."""
    return int.from_bytes(bytes([byte]) * dtype.itemsize, "little")


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high nibbles of every byte of integer words x, each byte-for-byte in place."""
    mask = _rep(0x0F, x.dtype)
    return x & mask, (x >> 4).bitwise_and_(mask)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """A dense, freshly allocated copy of x (so it can be viewed as wider words)."""
    return x.clone(memory_format=torch.contiguous_format)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of every block, as float32: (n, 1)."""
    return blocks[:, at : at + 2].view(torch.float16).float()


# Each dequantizer works on whole blocks at once with contiguous integer ops on 2-, 4- or
# 8-byte words (strided or broadcast ops on bytes fall off torch's vectorized paths), then
# one int → float copy and the float ops of the reference, in its order.


@_register(T.F16)
def _f16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float16))  # (n, 1); f16 → f32 is exact


@_register(T.BF16)
def _bf16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.bfloat16))  # (n, 1); bf16 → f32 is a 16-bit shift, exact


@_register(T.Q4_0)
def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: d f16 | qs[16]; x[j] = d * (lo(qs[j]) - 8), x[j+16] = d * (hi(qs[j]) - 8)
    lo, hi = _split(blocks.view(torch.int16))  # (n, 9) words; word 0 is d
    q = torch.cat((lo[:, 1:], hi[:, 1:]), 1).view(torch.uint8)  # (n, 32) in 0..15
    out.copy_(q.sub_(8).view(torch.int8))  # uint8 wrap-around read as int8: -8..7
    out.mul_(_half(blocks, 0))


@_register(T.Q4_1)
def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: d f16 | m f16 | qs[16]; x = d * q + m (two roundings, as the reference)
    lo, hi = _split(blocks.view(torch.int32))  # (n, 5) words; word 0 is d, m
    out.copy_(torch.cat((lo[:, 1:], hi[:, 1:]), 1).view(torch.uint8))  # (n, 32) in 0..15
    out.mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """qh u32 (n, 1) int32 → (n, 8) int32 whose 32 bytes are 16 * bit j of qh (LE order)."""
    nib = (qh >> _const(tuple(range(0, 32, 4)), torch.int32, qh.device)).bitwise_and_(0xF)
    # 4 bits → 4 bytes: bit k of nib lands on bit 8k+4 (the shifted copies never overlap)
    return nib.mul_(0x02040810).bitwise_and_(0x10101010)


@_register(T.Q5_0)
def _q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: d f16 | qh u32 | qs[16]; x = d * (q - 16), q = lo/hi nibble | bit j of qh << 4
    x = blocks.view(torch.int16)  # (n, 11): d | qh qh | qs * 8
    lo, hi = _split(x)
    q = torch.cat((lo[:, 3:], hi[:, 3:]), 1).view(torch.int32)  # (n, 8): low 4 bits
    qh = _packed(x[:, 1:3]).view(torch.int32)  # (n, 1)
    q.bitwise_or_(_q5_high(qh))
    out.copy_(q.view(torch.uint8).sub_(16).view(torch.int8))  # (n, 32) in -16..15
    out.mul_(_half(blocks, 0))


@_register(T.Q5_1)
def _q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: d f16 | m f16 | qh u32 | qs[16]; x = d * q + m
    x = blocks.view(torch.int32)  # (n, 6): d m | qh | qs * 4
    lo, hi = _split(x)
    q = torch.cat((lo[:, 2:], hi[:, 2:]), 1)  # (n, 8): low 4 bits
    out.copy_(q.bitwise_or_(_q5_high(x[:, 1:2])).view(torch.uint8))  # (n, 32) in 0..31
    out.mul_(_half(blocks, 0)).add_(_half(blocks, 2))


@_register(T.Q8_0)
def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: d f16 | qs int8[32]; x = qs * d
    out.copy_(blocks[:, 2:].view(torch.int8))  # (n, 32): int8 → f32 exactly
    out.mul_(_half(blocks, 0))


def _k_factors(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K sub-block factors d*scale and dmin*min, each (n, 8, 1) float32.

    Bytes 0..16: d f16 | dmin f16 | 12 bytes of 6-bit scales and mins, read as int32 words
    a (scales 0-3), b (mins 0-3), c (high parts: scales 4-7 low nibbles, mins 4-7 high).
    """
    n = blocks.shape[0]
    head = _packed(blocks.view(torch.int64)[:, :2].t())  # (2, n) words: long-row copy
    half = head[0].view(torch.float16).view(n, 4).float()  # (n, 4): d, dmin, (a as junk)
    w = head.view(torch.int32).view(2, n, 2)
    ab = torch.stack((w[0, :, 1], w[1, :, 0]))  # (2, n): a, b
    c = w[1, :, 1]  # (n,)
    low = ab & _rep(0x3F, torch.int32)  # scales 0-3 | mins 0-3
    high = c >> _const((0, 4), torch.int32, c.device).unsqueeze(-1)  # (2, n)
    high.bitwise_and_(_rep(0x0F, torch.int32))
    high.bitwise_or_((ab >> 2).bitwise_and_(_rep(0x30, torch.int32)))  # scales 4-7 | mins 4-7
    sm = torch.stack((low, high), 2).view(torch.uint8)  # (2, n, 8): scales, mins
    return (half[:, 0:1] * sm[0]).unsqueeze(-1), (half[:, 1:2] * sm[1]).unsqueeze(-1)


def _k_finish(q: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """out = (d*sc) * q - (dmin*m) for Q4_K/Q5_K; q (n, 8, 4) int64 words of 8 x 32 bytes."""
    n = blocks.shape[0]
    scale, offset = _k_factors(blocks)  # (n, 8, 1) each
    out = out.view(n, 8, 32)
    out.copy_(q.view(torch.uint8).view(n, 8, 32))
    out.mul_(scale).sub_(offset)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, g, w) int64 words → (n, g, 2, w): low nibbles of each group, then high ones."""
    return torch.stack(_split(qs), 2)


@_register(T.Q4_K)
def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: d f16 | dmin f16 | scales[12] | qs[128]; sub-block 2g/2g+1 = lo/hi of qs[32g:]
    n = blocks.shape[0]
    q = _k_nibbles(blocks.view(torch.int64)[:, 2:].view(n, 4, 4))  # (n, 4, 2, 4)
    _k_finish(q.view(n, 8, 4), blocks, out)


@_register(T.Q5_K)
def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]; bit j of qh[i] → sub-block j
    n = blocks.shape[0]
    x = blocks.view(torch.int64)  # (n, 22): header * 2 | qh * 4 | qs * 16
    q = _k_nibbles(x[:, 6:].view(n, 4, 4)).view(n, 8, 4)
    shifts = _const(tuple(range(8)), torch.int64, x.device).unsqueeze(-1)  # (8, 1)
    high = (x[:, 2:6].unsqueeze(1) >> shifts).bitwise_and_(_rep(0x01, torch.int64))
    _k_finish(q.bitwise_or_(high.bitwise_left_shift_(4)), blocks, out)  # (n, 8, 4)


@_register(T.Q6_K)
def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: ql[128] | qh[64] | scales int8[16] | d f16; 16 sub-blocks of 16
    n = blocks.shape[0]
    x = _packed(blocks.view(torch.int16)[:, :96])
    x = x.view(torch.int64)  # (n, 24): ql | qh
    q = _k_nibbles(x[:, :16].view(n, 2, 8)).view(n, 2, 4, 4)  # (n, half, 4 x 32 bytes)
    shifts = _const((0, 2, 4, 6), torch.int64, x.device).unsqueeze(-1)  # (4, 1)
    high = (x[:, 16:].view(n, 2, 1, 4) >> shifts).bitwise_and_(_rep(0x03, torch.int64))
    q = q.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.uint8).sub_(32)  # 0..63 - 32
    out = out.view(n, 16, 16)
    out.copy_(q.view(torch.int8).view(n, 16, 16))
    out.mul_((_half(blocks, 208) * blocks[:, 192:208].view(torch.int8)).unsqueeze(-1))


def _crumbs(words: torch.Tensor) -> torch.Tensor:
    """(n, g, w) int64 words → (n, g, 4, w): bits 0-1 of every byte, then 2-3, 4-5, 6-7."""
    shifts = _const((0, 2, 4, 6), torch.int64, words.device).unsqueeze(-1)  # (4, 1)
    return (words.unsqueeze(2) >> shifts).bitwise_and_(_rep(0x03, torch.int64))


@_register(T.Q2_K)
def _q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: scales[16] | qs[64] | d f16 | dmin f16; 16 sub-blocks of 16, x = d*sc*q - dmin*m
    # with sc, m the low and high nibbles of scales[j]; element 128h + 32k + l is bits 2k of
    # qs[32h + l]
    n = blocks.shape[0]
    q = _crumbs(_packed(blocks[:, 16:80]).view(torch.int64).view(n, 2, 4))  # (n, 2, 4, 4) words
    sc = blocks[:, :16]  # (n, 16)
    dl = (_half(blocks, 80) * (sc & 0xF)).unsqueeze(-1)  # (n, 16, 1)
    ml = (_half(blocks, 82) * (sc >> 4)).unsqueeze(-1)
    out = out.view(n, 16, 16)
    out.copy_(q.view(torch.uint8).view(n, 16, 16))
    out.mul_(dl).sub_(ml)


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 scale bytes (n, 12) → (n, 16) float32 signed scales (6 bits, minus 32)."""
    low = torch.cat((s[:, :8] & 0xF, s[:, :8] >> 4), 1)  # (n, 16)
    shifts = _const((0, 2, 4, 6), torch.uint8, s.device).unsqueeze(-1)  # (4, 1)
    high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).view(-1, 16)  # (n, 16)
    return low.bitwise_or_(high << 4).view(torch.int8).sub_(32).float()


@_register(T.Q3_K)
def _q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: hmask[32] | qs[64] | scales[12] | d f16; element 32i + l (i = 4h + k) is bits 2k
    # of qs[32h + l] minus 4 where bit i of hmask[l] is clear; x = d * sc_j * q, j = e // 16
    n = blocks.shape[0]
    qs = _packed(blocks[:, 32:96]).view(torch.int64).view(n, 2, 4)
    q = _crumbs(qs).view(n, 8, 4)  # (n, 8, 4) words: 8 x 32 bytes, 0..3
    hm = _packed(blocks[:, :32]).view(torch.int64).unsqueeze(1)  # (n, 1, 4)
    shifts = _const(tuple(range(8)), torch.int64, blocks.device).unsqueeze(-1)  # (8, 1)
    clear = (
        (hm >> shifts).bitwise_and_(_rep(0x01, torch.int64)).bitwise_xor_(_rep(0x01, torch.int64))
    )
    q = q.view(torch.uint8).sub_(clear.bitwise_left_shift_(2).view(torch.uint8))  # wraps
    dl = (_half(blocks, 108) * _q3_scales(blocks[:, 96:108])).unsqueeze(-1)  # (n, 16, 1)
    out = out.view(n, 16, 16)
    out.copy_(q.view(torch.int8).view(n, 16, 16))  # -4..3
    out.mul_(dl)


# The 16 non-linear levels of IQ4_NL and IQ4_XS (kvalues_iq4nl, ggml-common.h).
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_values(qs: torch.Tensor) -> torch.Tensor:
    """(n, g, w) int64 words of nibbles → (n, g, 2, 8w) float32 levels: low nibbles of each
    group's bytes, then high ones."""
    idx = _k_nibbles(qs).view(torch.uint8).long()
    return torch.take(_const(IQ4_LEVELS, torch.float32, qs.device), idx)


@_register(T.IQ4_NL)
def _iq4_nl(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: d f16 | qs[16]; x[j] = d * L[lo(qs[j])], x[j+16] = d * L[hi(qs[j])]
    n = blocks.shape[0]
    qs = _packed(blocks[:, 2:]).view(torch.int64).view(n, 1, 2)
    out.copy_(_iq4_values(qs).view(n, 32)).mul_(_half(blocks, 0))


@_register(T.IQ4_XS)
def _iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: d f16 | scales_h u16 | scales_l[4] | qs[128]; sub-block j of 32: scale
    # (nibble j of scales_l | bits 2j of scales_h << 4) - 32, values as IQ4_NL's on qs[16j:]
    n = blocks.shape[0]
    x = blocks.view(torch.int64)  # (n, 17): header | qs * 16
    low = blocks[:, 4:8]
    low = torch.stack((low & 0xF, low >> 4), 2).view(n, 8)  # (n, 8)
    sh = blocks[:, 2:4].view(torch.int16).int()  # (n, 1)
    shifts = _const(tuple(range(0, 16, 2)), torch.int32, blocks.device)  # (8,)
    high = ((sh >> shifts) & 3).to(torch.uint8)  # (n, 8)
    sc = low.bitwise_or_(high << 4).view(torch.int8).sub_(32).float()
    dl = (_half(blocks, 0) * sc).unsqueeze(-1)  # (n, 8, 1)
    out = out.view(n, 8, 32)
    out.copy_(_iq4_values(x[:, 1:].view(n, 8, 2)).view(n, 8, 32)).mul_(dl)


DEQUANTIZERS[int(T.MXFP4)] = dequantize_mxfp4  # its own file: quant/mxfp4.py


def _check(data: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """Validate packed bytes (..., R); return them contiguous and 8-byte aligned."""
    if data.dtype != torch.uint8:
        raise TypeError(f"dequantize wants uint8 bytes, got {data.dtype}")
    if data.dim() == 0 or data.shape[-1] % fmt.type_size != 0:
        raise ValueError(
            f"bytes of shape {tuple(data.shape)} are not whole rows of {fmt.name} blocks "
            f"({fmt.type_size} bytes each)"
        )
    if not data.is_contiguous():
        return data.contiguous()
    if data.storage_offset() % 8 or data.data_ptr() % 8:  # for the int16..int64 word views
        return data.clone()
    return data


def dequantize(data: torch.Tensor, ggml_type: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unpack GGML blocks to float32: uint8 (..., R) → (..., R // type_size * block_size).

    Bit-exact with `gguf.quants.dequantize`. The input is never written to (it may be a
    read-only mmap view). `out`, if given, is a contiguous float32 tensor of the result's
    shape to fill and return (reusing one avoids the page faults of a fresh allocation).
    Without `out`, F32 data comes back as a zero-copy view of the input: treat it as
    read-only.
    """
    fmt = block_format(ggml_type)
    data = _check(data, fmt)
    *lead, row = data.shape
    shape = (*lead, row // fmt.type_size * fmt.block_size)
    n_blocks = data.numel() // fmt.type_size
    blocks = data.view(n_blocks, fmt.type_size)  # (n, type_size)
    if fmt.name == "F32" and out is None:
        return blocks.view(torch.float32).view(shape)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=data.device)
    elif (
        out.shape != shape
        or out.dtype != torch.float32
        or not out.is_contiguous()
        or out.device != data.device
    ):
        raise ValueError(
            f"out must be a contiguous float32 tensor of shape {shape} on {data.device}"
        )
    flat = out.view(n_blocks, fmt.block_size)  # (n, block_size)
    if fmt.name == "F32":
        flat.copy_(blocks.view(torch.float32))
        return out
    fn = DEQUANTIZERS[fmt.ggml_type]
    step = max(1, CHUNK_ELEMENTS // fmt.block_size)
    for start in range(0, n_blocks, step):
        fn(blocks[start : start + step], flat[start : start + step])
    return out
