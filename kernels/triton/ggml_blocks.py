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
    Q5_K  256  176    d f16 | dmin f16 | scales[12] | qh[32] | qs[128] as Q4_K, q | bit s of qh[j%32] << 4
    Q6_K  256  210    ql[128] | qh[64] | scales int8[16] | d f16       d·sc[j/16]·(q − 32)
    Q2_K  256   84    scales[16] | qs[64] | d f16 | dmin f16           d·(sc&15)·q − dmin·(sc>>4), sc = scales[j/16]
    Q3_K  256  110    hmask[32] | qs[64] | scales[12] | d f16          d·(sc6(j/16) − 32)·(q − 4·!bit)
    IQ4_NL  32   18   d f16 | qs[16]                                   d·L[nib(j)]
    IQ4_XS 256  136   d f16 | scales_h u16 | scales_l[4] | qs[128]     d·(sc6(j/32) − 32)·L[nib]

where nib(j) is the low nibble of qs[j] for j < 16 and the high nibble of qs[j − 16] after;
Q2_K/Q3_K's q is bits 2k of qs[32h + l] for j = 128h + 32k + l, and Q3_K's bit is bit j/32
of hmask[j % 32]; L is the 16 non-linear levels of IQ4 (kvalues_iq4nl).
The float operations are those of the reference, in its order, so tiles are bit-exact with
quant.dequant.dequantize.
"""

from __future__ import annotations

import triton
import triton.language as tl

# GGML type numbers (gguf.GGMLQuantizationType) of the formats unpacked here.
Q4_0, Q4_1, Q5_0, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 2, 3, 6, 8, 10, 11, 12, 13, 14
IQ4_NL, IQ4_XS = 20, 23
# type → (elements per block QK, bytes per block)
GEOMETRY = {
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q8_0: (32, 34),
    Q4_K: (256, 144),
    Q6_K: (256, 210),
    Q2_K: (256, 84),
    Q3_K: (256, 110),
    Q5_K: (256, 176),
    IQ4_NL: (32, 18),
    IQ4_XS: (256, 136),
}
# The IQ4 levels + 128 as bytes, six to a 48-bit word (IQ4_LEVELS[i] = byte i − 128).
_IQ4_W0: tl.constexpr = tl.constexpr(0x5D4F3F2D1801)
_IQ4_W1: tl.constexpr = tl.constexpr(0xA6998D81766A)
_IQ4_W2: tl.constexpr = tl.constexpr(0xF1D9C5B5)


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
def _k4_scale_min(base, mask, s):
    """Q4_K/Q5_K's 6-bit scale and min of sub-block s (ggml's get_scale_min_k4), int32."""
    #   s < 4: sc = sb[s] & 63,                          m = sb[s+4] & 63
    #   s ≥ 4: sc = sb[s+4] & 15 | (sb[s-4] >> 6) << 4,  m = sb[s+4] >> 4 | (sb[s] >> 6) << 4
    a = _byte(base + 4 + s, mask)
    b = _byte(base + 8 + s, mask)
    c = _byte(base + 4 + (s % 4), mask)
    low = s < 4
    sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc, mn


@triton.jit
def _q5_k(base, mask, j):
    s = j // 32
    sc, mn = _k4_scale_min(base, mask, s)
    q = (_byte(base + 48 + 32 * (s // 2) + j % 32, mask) >> ((s % 2) * 4)) & 0xF
    q = q | (((_byte(base + 16 + j % 32, mask) >> s) & 1) << 4)
    scale = _f16(base, mask) * sc.to(tl.float32)
    offset = _f16(base + 2, mask) * mn.to(tl.float32)
    return q.to(tl.float32) * scale - offset


@triton.jit
def _crumb(base, mask, at, j):
    """Q2_K/Q3_K's 2-bit value of element j = 128h + 32k + l: bits 2k of byte at + 32h + l."""
    return (_byte(base + at + 32 * (j // 128) + j % 32, mask) >> (2 * ((j % 128) // 32))) & 3


@triton.jit
def _q2_k(base, mask, j):
    sc = _byte(base + j // 16, mask)
    dl = _f16(base + 80, mask) * (sc & 0xF).to(tl.float32)
    ml = _f16(base + 82, mask) * (sc >> 4).to(tl.float32)
    return dl * _crumb(base, mask, 16, j).to(tl.float32) - ml


@triton.jit
def _q3_k(base, mask, j):
    # scale s = j // 16 (6 bits, −32): low 4 bits from nibble s // 8 of scales[s % 8], high 2
    # bits from bits 2(s // 4) of scales[8 + s % 4]
    s = j // 16
    low = (_byte(base + 96 + s % 8, mask) >> (4 * (s // 8))) & 0xF
    high = (_byte(base + 104 + s % 4, mask) >> (2 * (s // 4))) & 3
    dl = _f16(base + 108, mask) * ((low | (high << 4)) - 32).to(tl.float32)
    bit = (_byte(base + j % 32, mask) >> (j // 32)) & 1
    q = _crumb(base, mask, 32, j) - 4 * (1 - bit)
    return dl * q.to(tl.float32)


@triton.jit
def _iq4_level(idx):
    """The IQ4 level of nibbles idx (int32) → float32, from the three 48-bit words."""
    word = tl.where(idx < 6, _IQ4_W0, tl.where(idx < 12, _IQ4_W1, _IQ4_W2)).to(tl.int64)
    return (((word >> ((idx % 6) * 8).to(tl.int64)) & 0xFF).to(tl.int32) - 128).to(tl.float32)


@triton.jit
def _iq4_nl(base, mask, j):
    return _f16(base, mask) * _iq4_level(_nibble32(base, mask, 2, j))


@triton.jit
def _iq4_xs(base, mask, j):
    # sub-block s = j // 32: scale (nibble s % 2 of scales_l[s // 2] | bits 2s of scales_h
    # << 4) − 32; its values are a 32-element block's nibbles at qs[16s]
    s = j // 32
    low = (_byte(base + 4 + s // 2, mask) >> (4 * (s % 2))) & 0xF
    high = (_byte(base + 2 + s // 4, mask) >> (2 * (s % 4))) & 3
    dl = _f16(base, mask) * ((low | (high << 4)) - 32).to(tl.float32)
    return dl * _iq4_level(_nibble32(base, mask, 8 + 16 * s, j % 32))


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
    elif QTYPE == 13:
        x = _q5_k(base, mask, j)
    elif QTYPE == 10:
        x = _q2_k(base, mask, j)
    elif QTYPE == 11:
        x = _q3_k(base, mask, j)
    elif QTYPE == 20:
        x = _iq4_nl(base, mask, j)
    elif QTYPE == 23:
        x = _iq4_xs(base, mask, j)
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
