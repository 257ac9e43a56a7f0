"""Triton device functions that unpack GGML blocks to float32 tiles, read from packed bytes.

Each function takes `base`, a (BN, NB, 1) tensor of pointers to the first byte of a block
(BN weight rows × NB consecutive blocks of each row), a mask of the same shape, and returns
the blocks' values as a (BN, NB, QK) float32 tile. Layouts (ggml-common.h, and gguf-py's
quants.py, which quant/dequant.py matches bit for bit):

    type  QK   bytes  layout                                          value of element j
    Q4_0   32   18    d f16 | qs[16]                                   d·(nib(j) − 8)
    Q4_1   32   20    d f16 | m f16 | qs[16]                           d·nib(j) + m
    Q5_0   32   22    d f16 | qh u32 | qs[16]                          d·(nib(j) | bit_j(qh)<<4 − 16)
    Q8_0   32   34    d f16 | qs int8[32]                              d·qs[j]
    Q4_K  256  144    d f16 | dmin f16 | scales[12] | qs[128]          d·sc(s)·q − dmin·m(s), s = j/32
    Q6_K  256  210    ql[128] | qh[64] | scales int8[16] | d f16       d·sc[j/16]·(q − 32)

where nib(j) is the low nibble of qs[j] for j < 16 and the high nibble of qs[j − 16] after.
The float operations are those of the reference, in its order, so tiles are bit-exact with
quant.dequant.dequantize.
"""

from __future__ import annotations

import triton
import triton.language as tl

# GGML type numbers (gguf.GGMLQuantizationType) of the formats unpacked here.
Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K = 2, 3, 6, 8, 12, 14
# type → (elements per block QK, bytes per block)
GEOMETRY = {
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q8_0: (32, 34),
    Q4_K: (256, 144),
    Q6_K: (256, 210),
}


@triton.jit
def _f16(ptr, mask):
    """The little-endian float16 at ptr, as float32 (same shape as ptr)."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(ptr, mask):
    """The unsigned byte at ptr, as int32."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _nibble32(base, mask, at, j):
    """nib(j) of a 32-element block whose qs[16] start at byte `at`: (BN, NB, 32) int32."""
    return (_byte(base + at + (j % 16), mask) >> ((j // 16) * 4)) & 0xF


@triton.jit
def _q4_0(base, mask, j):
    return (_nibble32(base, mask, 2, j) - 8).to(tl.float32) * _f16(base, mask)


@triton.jit
def _q4_1(base, mask, j):
    return _nibble32(base, mask, 4, j).to(tl.float32) * _f16(base, mask) + _f16(base + 2, mask)


@triton.jit
def _q5_0(base, mask, j):
    high = (_byte(base + 2 + j // 8, mask) >> (j % 8)) & 1  # bit j of qh (little-endian u32)
    q = _nibble32(base, mask, 6, j) | (high << 4)
    return (q - 16).to(tl.float32) * _f16(base, mask)


@triton.jit
def _q8_0(base, mask, j):
    q = tl.load(base + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True)
    return q.to(tl.float32) * _f16(base, mask)


@triton.jit
def _q4_k(base, mask, j):
    # sub-block s = j // 32 has a 6-bit scale and min (ggml's get_scale_min_k4):
    #   s < 4: sc = sb[s] & 63,                          m = sb[s+4] & 63
    #   s ≥ 4: sc = sb[s+4] & 15 | (sb[s-4] >> 6) << 4,  m = sb[s+4] >> 4 | (sb[s] >> 6) << 4
    s = j // 32
    a = _byte(base + 4 + s, mask)
    b = _byte(base + 8 + s, mask)
    c = _byte(base + 4 + (s % 4), mask)
    low = s < 4
    sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    # quants: sub-blocks 2g and 2g+1 are the low and high nibbles of qs[32g : 32g+32]
    q = (_byte(base + 16 + 32 * (s // 2) + j % 32, mask) >> ((s % 2) * 4)) & 0xF
    scale = _f16(base, mask) * sc.to(tl.float32)
    offset = _f16(base + 2, mask) * mn.to(tl.float32)
    return q.to(tl.float32) * scale - offset


@triton.jit
def _q6_k(base, mask, j):
    # element j: half h = j // 128; in it, quarter t = (j % 128) // 32 and lane l = j % 32;
    # low 4 bits: nibble t // 2 of ql[64h + 32(t % 2) + l]; high 2: bits 2t of qh[32h + l]
    h = j // 128
    t = (j % 128) // 32
    lane = j % 32
    low = (_byte(base + 64 * h + 32 * (t % 2) + lane, mask) >> ((t // 2) * 4)) & 0xF
    high = (_byte(base + 128 + 32 * h + lane, mask) >> (2 * t)) & 3
    sc = tl.load(base + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
    scale = _f16(base + 208, mask) * sc.to(tl.float32)
    return scale * ((low | (high << 4)) - 32).to(tl.float32)


@triton.jit
def dequant_blocks(base, mask, QTYPE: tl.constexpr, QK: tl.constexpr):
    """Blocks at `base` (BN, NB, 1) → their values (BN, NB, QK) float32 (0 where masked)."""
    j = tl.arange(0, QK)[None, None, :]
    if QTYPE == 2:
        x = _q4_0(base, mask, j)
    elif QTYPE == 3:
        x = _q4_1(base, mask, j)
    elif QTYPE == 6:
        x = _q5_0(base, mask, j)
    elif QTYPE == 8:
        x = _q8_0(base, mask, j)
    elif QTYPE == 12:
        x = _q4_k(base, mask, j)
    else:
        tl.static_assert(QTYPE == 14, "dequant_blocks: unsupported GGML type")
        x = _q6_k(base, mask, j)
    return tl.where(mask, x, 0.0)


@triton.jit
def dequant_tile(
    w_ptr,
    rows,
    row_mask,
    row_bytes,
    blk,
    blk_mask,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BN: tl.constexpr,
    NB: tl.constexpr,
):
    """Rows `rows` (BN,) × blocks `blk` (NB,) of a packed (N, row_bytes) uint8 weight →
    (BN, NB·QK) float32, the elements of those blocks in row order."""
    base = (
        w_ptr + rows.to(tl.int64)[:, None, None] * row_bytes + (blk * TYPE_SIZE)[None, :, None]
    )  # (BN, NB, 1)
    mask = row_mask[:, None, None] & blk_mask[None, :, None]
    return tl.reshape(dequant_blocks(base, mask, QTYPE, QK), (BN, NB * QK))
