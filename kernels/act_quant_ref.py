"""A plain torch reference of llama.cpp's CPU quantized matmul, written for clarity.

It is the oracle for the native kernel (kernels/native/qmatmul.cpp) and does the same
arithmetic, step by step, as ggml-cpu does for `y = x · Wᵀ` with W in GGML blocks:

1. the activations x are quantized per block to the weight type's "vec_dot type" (VEC_DOT):
   Q8_0 and Q8_1 as ggml-cpu's AVX2 quantize_row_q8_0/q8_1 (d = amax/127 stored fp16,
   q = round-half-even(x · 127/amax); Q8_1 adds s = fp16(d · Σq)); Q8_K as
   quantize_row_q8_K_ref (the first element of largest |x| sets iscale = -127/max,
   q = min(127, nearest(iscale · x)), d = 1/iscale in float32, plus per-16 sums bsums);
2. each weight block is decoded to its integer values and scales (ggml-common.h layouts);
3. per block, an exact integer dot product Σ q_w · q_x, then the float32 scale product
   d_w · d_x (and the min terms) as ggml's *_generic vec_dot functions compute them.

`reference(x, w, type)` returns the per-block terms summed in float64, and the sum of their
magnitudes: the native kernel differs from it only by float32 summation order.
Slow (float64 einsums over every block) and meant for small test shapes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from gguf import GGMLQuantizationType as T

from quant import mxfp4

VEC_DOT = {
    T.Q4_0: "Q8_0",
    T.Q5_0: "Q8_0",
    T.Q8_0: "Q8_0",
    T.Q4_1: "Q8_1",
    T.Q5_1: "Q8_1",
    T.Q4_K: "Q8_K",
    T.Q5_K: "Q8_K",
    T.Q6_K: "Q8_K",
    T.Q2_K: "Q8_K",
    T.Q3_K: "Q8_K",
    T.IQ4_XS: "Q8_K",
    T.IQ4_NL: "Q8_0",
    T.MXFP4: "Q8_0",
}
# kvalues_iq4nl (ggml-common.h): the levels IQ4_NL and IQ4_XS nibbles index
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
ACT_KIND = {"Q8_0": 0, "Q8_1": 1, "Q8_K": 2}  # the native quantize_activations' numbering


@dataclass
class Acts:
    q: torch.Tensor  # (M, nb, bs) int64 quantized values
    d: torch.Tensor  # (M, nb) float32 block scale (Q8_0/Q8_1: the fp16 value, as float)
    s: torch.Tensor | None = None  # (M, nb) float32: Q8_1's fp16(d · Σq)
    bsums: torch.Tensor | None = None  # (M, nb, 16) int64: Q8_K's per-16 sums of q


def quantize_q8_0(x: torch.Tensor, with_sum: bool = False) -> Acts:
    """Q8_0 (Q8_1 with `with_sum`) blocks of 32 of x (M, K) float32."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    amax = blocks.abs().amax(-1)
    d = amax / 127
    # (a Python number / tensor is computed by torch as reciprocal · number: two roundings;
    # dividing two tensors rounds once, as C does)
    inv = torch.where(amax != 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv[..., None])  # torch.round: halves to even, as vroundps
    s = (d * q.sum(-1)).half().float() if with_sum else None
    return Acts(q.long(), d.half().float(), s)


def quantize_q8_k(x: torch.Tensor) -> Acts:
    """Q8_K blocks of 256 of x (M, K) float32."""
    m, k = x.shape
    blocks = x.reshape(m, k // 256, 256)
    first = blocks.abs().argmax(-1, keepdim=True)  # argmax: the first maximal index
    top = blocks.gather(-1, first).squeeze(-1)
    zero = top == 0
    iscale = torch.full_like(top, -127) / torch.where(zero, torch.ones_like(top), top)
    q = torch.round(blocks * iscale[..., None]).clamp(max=127)
    q[zero] = 0
    d = torch.where(zero, torch.zeros_like(iscale), torch.ones_like(iscale) / iscale)
    q = q.long()
    return Acts(q, d, bsums=q.reshape(m, k // 256, 16, 16).sum(-1))


def quantize_acts(x: torch.Tensor, ggml_type: int) -> Acts:
    kind = VEC_DOT[T(ggml_type)]
    return quantize_q8_k(x) if kind == "Q8_K" else quantize_q8_0(x, with_sum=kind == "Q8_1")


# ---- weight decoding: blocks (N, nb, type_size) uint8 → integer values and scales


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[..., at : at + 2].contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes → (..., 32): low nibbles (elements 0..15), then high ones (16..31)."""
    return torch.cat((qs & 0xF, qs >> 4), -1).long()


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(..., 4) bytes of a little-endian u32 → (..., 32): bit j of it."""
    j = torch.arange(32)
    return (qh[..., j // 8].long() >> (j % 8)) & 1


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes → 8 six-bit scales and 8 mins (get_scale_min_k4), each (..., 8)."""
    s = s.long()
    lo_sc, lo_mn = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_mn = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat((lo_sc, hi_sc), -1), torch.cat((lo_mn, hi_mn), -1)


def _k_values(qs: torch.Tensor, qh: torch.Tensor | None) -> torch.Tensor:
    """Q4_K/Q5_K values (..., 8, 32): sub-block 2c/2c+1 = low/high nibbles of qs[32c:32c+32],
    plus (Q5_K) bit 2c/2c+1 of qh[l] as 16."""
    qs = qs.reshape(*qs.shape[:-1], 4, 32)
    v = torch.stack((qs & 0xF, qs >> 4), -2).long().reshape(*qs.shape[:-2], 8, 32)
    if qh is not None:
        j = torch.arange(8)[:, None]
        v = v + (((qh.long()[..., None, :] >> j) & 1) << 4)
    return v


def _q6_values(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K values (..., 16, 16) in -32..31."""
    halves = []
    for h in range(2):
        ql = blocks[..., 64 * h : 64 * h + 64].long()
        qh = blocks[..., 128 + 32 * h : 160 + 32 * h].long()
        a, b = ql[..., :32], ql[..., 32:]
        halves += [
            (a & 0xF) | ((qh & 3) << 4),
            (b & 0xF) | (((qh >> 2) & 3) << 4),
            (a >> 4) | (((qh >> 4) & 3) << 4),
            (b >> 4) | (((qh >> 6) & 3) << 4),
        ]
    v = torch.cat(halves, -1) - 32  # (..., 256)
    return v.reshape(*v.shape[:-1], 16, 16)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """2-bit values of 64 bytes (..., 64) → (..., 8, 32): element 128h + 32k + l is bits 2k
    of byte 32h + l (Q2_K's and Q3_K's order), as rows i = 4h + k."""
    qs = qs.long().reshape(*qs.shape[:-1], 2, 1, 32)
    k = torch.arange(4)[:, None]
    return ((qs >> (2 * k)) & 3).reshape(*qs.shape[:-3], 8, 32)


def _q2_parts(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q2_K values (..., 16, 16) in 0..3, scales and mins (..., 16) in 0..15."""
    v = _crumbs(blocks[..., 16:80]).reshape(*blocks.shape[:-1], 16, 16)
    s = blocks[..., :16].long()
    return v, s & 0xF, s >> 4


def _q3_parts(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K values (..., 16, 16) in -4..3 and signed scales (..., 16) in -32..31."""
    hm = blocks[..., :32].long()[..., None, :]  # (..., 1, 32)
    high = (hm >> torch.arange(8)[:, None]) & 1  # (..., 8, 32): bit i of hmask[l]
    v = (_crumbs(blocks[..., 32:96]) - 4 * (1 - high)).reshape(*blocks.shape[:-1], 16, 16)
    s = blocks[..., 96:108].long()
    low = torch.cat((s[..., :8] & 0xF, s[..., :8] >> 4), -1)  # (..., 16)
    hi = (s[..., None, 8:12] >> (2 * torch.arange(4))[:, None]) & 3  # (..., 4, 4): j = 4a + b
    return v, (low | (hi.reshape(*s.shape[:-1], 16) << 4)) - 32


def _iq4_levels(qs: torch.Tensor) -> torch.Tensor:
    """Nibbles of (..., 16) bytes → (..., 32) levels: low nibbles, then high (Q4_0's order)."""
    idx = torch.cat((qs.long() & 0xF, qs.long() >> 4), -1)
    return torch.tensor(IQ4_LEVELS)[idx]


def _iq4xs_parts(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ4_XS levels (..., 8, 32) and signed scales (..., 8) in -32..31."""
    v = _iq4_levels(blocks[..., 8:136].reshape(*blocks.shape[:-1], 8, 16))
    low = blocks[..., 4:8].long()
    low = torch.stack((low & 0xF, low >> 4), -1).reshape(*low.shape[:-1], 8)
    h = blocks[..., 2].long() | (blocks[..., 3].long() << 8)
    high = (h[..., None] >> (2 * torch.arange(8))) & 3
    return v, (low | (high << 4)) - 32


def _idot(qw: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
    """Exact integer dot products per block: qw (N, nb, ..., L), qx (M, nb, ..., L) →
    (M, N, nb, ...) float64 (all sums are far below 2^53)."""
    return torch.einsum("nb...l,mb...l->mnb...", qw.double(), qx.double())


def reference(
    x: torch.Tensor, w: torch.Tensor, ggml_type: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, magnitude), both (M, N) float64: y = Σ over blocks of llama.cpp's per-block terms,
    magnitude = Σ of their absolute values (the scale of float32 summation error)."""
    qt = T(ggml_type)
    a = quantize_acts(x, ggml_type)
    m, nb = a.d.shape
    n = w.shape[0]
    blocks = w.reshape(n, nb, -1)
    dx = a.d[:, None, :]  # (M, 1, nb)
    if qt in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        if qt == T.Q8_0:
            qw = blocks[..., 2:].view(torch.int8).long()
        elif qt == T.Q4_0:
            qw = _nibbles(blocks[..., 2:]) - 8
        elif qt == T.Q4_1:
            qw = _nibbles(blocks[..., 4:])
        elif qt == T.Q5_0:
            qw = (_nibbles(blocks[..., 6:]) | (_bits32(blocks[..., 2:6]) << 4)) - 16
        else:
            qw = _nibbles(blocks[..., 8:]) | (_bits32(blocks[..., 4:8]) << 4)
        scale = (_half(blocks, 0)[None] * dx).double()  # float32 product d_w · d_x
        terms = [scale * _idot(qw, a.q)]
        if qt in (T.Q4_1, T.Q5_1):  # + m_w · s_x
            assert a.s is not None  # their VEC_DOT is Q8_1, which carries s
            terms.append((_half(blocks, 2)[None] * a.s[:, None, :]).double())
    elif qt in (T.Q4_K, T.Q5_K):
        q5 = qt == T.Q5_K
        qw = _k_values(
            blocks[..., 48:176] if q5 else blocks[..., 16:144], blocks[..., 16:48] if q5 else None
        )  # (N, nb, 8, 32)
        sc, mn = _k4_scales(blocks[..., 4:16])  # (N, nb, 8)
        assert a.bsums is not None  # their VEC_DOT is Q8_K, which carries bsums
        isum = (_idot(qw, a.q.reshape(m, nb, 8, 32)) * sc[None].double()).sum(-1)
        pair_sums = a.bsums.reshape(m, nb, 8, 2).sum(-1)  # Σq per 32-element sub-block
        imin = (mn[None].double() * pair_sums[:, None].double()).sum(-1)
        terms = [
            (_half(blocks, 0)[None] * dx).double() * isum,
            -(_half(blocks, 2)[None] * dx).double() * imin,
        ]
    elif qt == T.IQ4_NL:
        scale = (_half(blocks, 0)[None] * dx).double()
        terms = [scale * _idot(_iq4_levels(blocks[..., 2:18]), a.q)]
    elif qt == T.MXFP4:  # doubled E2M1 values, the E8M0 scale halved (float32 product)
        qw = torch.tensor(mxfp4.KVALUES)[_nibbles(blocks[..., 1:17])]
        scale = (mxfp4.e8m0_half(blocks[..., 0])[None] * dx).double()
        terms = [scale * _idot(qw, a.q)]
    elif qt in (T.Q3_K, T.IQ4_XS):
        qw, sc = _q3_parts(blocks) if qt == T.Q3_K else _iq4xs_parts(blocks)
        sub = qw.shape[-2]  # 16 sub-blocks of 16, or 8 of 32
        isum = (_idot(qw, a.q.reshape(m, nb, sub, -1)) * sc[None].double()).sum(-1)
        at = 108 if qt == T.Q3_K else 0
        terms = [(_half(blocks, at)[None] * dx).double() * isum]
    elif qt == T.Q2_K:
        qw, sc, mn = _q2_parts(blocks)
        assert a.bsums is not None  # Q8_K carries bsums
        isum = (_idot(qw, a.q.reshape(m, nb, 16, 16)) * sc[None].double()).sum(-1)
        imin = (mn[None].double() * a.bsums[:, None].double()).sum(-1)
        terms = [
            (_half(blocks, 80)[None] * dx).double() * isum,
            -(_half(blocks, 82)[None] * dx).double() * imin,
        ]
    elif qt == T.Q6_K:
        sc = blocks[..., 192:208].contiguous().view(torch.int8).double()  # (N, nb, 16)
        isum = (_idot(_q6_values(blocks), a.q.reshape(m, nb, 16, 16)) * sc[None]).sum(-1)
        terms = [(_half(blocks, 208)[None] * dx).double() * isum]
    else:
        raise ValueError(f"no reference for {qt.name}")
    # `terms` is never empty, so both sums are tensors (never sum()'s start, 0)
    y = cast(torch.Tensor, sum(t.sum(-1) for t in terms))
    magnitude = cast(torch.Tensor, sum(t.abs().sum(-1) for t in terms))
    return y, magnitude


def dequantized_activations(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """x̂ (M, K) float64: the values the quantized activations stand for (d · q)."""
    a = quantize_acts(x, ggml_type)
    return (a.d.double()[..., None] * a.q.double()).reshape(x.shape)
