"""kv_write: store new keys and values into their paged slots.

Slot `s` of a layer's pool (num_blocks, PAGE, n_head_kv, D) is block s // PAGE, offset
s % PAGE (slot_mapping comes from the block tables: block * PAGE + offset). A negative slot
marks a padding row and is skipped. Two pool types (runtime/kv/kv_pool.py):

- float16: values rounded to nearest even on the way in.
- q8_0 (given the scale pools (num_blocks, PAGE, n_head_kv, D/32) float16): per 32 values of
  a head row, d = max|x| / 127 stored as float16 and q = round-half-even(x · (1/d)) as int8,
  the float32 operations of kv_pool's CPU write in its order, so both store the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.paged_attention import PAGE, QBLOCK

# Launches pass Python ints/bools to `tl.constexpr` parameters (Triton's convention), which
# pyright reads as instances of the class tl.constexpr: that rule only is off here.
# pyright: reportArgumentType=false


@triton.jit
def _write_kernel(
    k_ptr,
    v_ptr,
    kp_ptr,
    vp_ptr,
    slots_ptr,
    stride_kt,
    stride_vt,
    stride_kpb,
    stride_kpt,
    stride_vpb,
    stride_vpt,
    KD,
    VD,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0)  # one new token per program
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        block, off = slot // PAGE, slot % PAGE
        ik, iv = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_V)  # over n_head_kv · D
        k = tl.load(k_ptr + t * stride_kt + ik, mask=ik < KD)
        tl.store(
            kp_ptr + block * stride_kpb + off * stride_kpt + ik,
            k.to(kp_ptr.dtype.element_ty),
            mask=ik < KD,
        )
        v = tl.load(v_ptr + t * stride_vt + iv, mask=iv < VD)
        tl.store(
            vp_ptr + block * stride_vpb + off * stride_vpt + iv,
            v.to(vp_ptr.dtype.element_ty),
            mask=iv < VD,
        )


@triton.jit
def _round_half_even(y):
    """y (float32) rounded to an integer, ties to even (torch.round's rule)."""
    f = tl.floor(y)
    diff = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(diff > 0.5, f + 1.0, tl.where(diff < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _quantize_row(src, q_dst, s_dst, n_blocks, NB: tl.constexpr, QBLOCK: tl.constexpr):
    """One token's row of n_blocks·QBLOCK float32 values → int8 values and a float16 scale
    per QBLOCK."""
    b = tl.arange(0, NB)  # (NB,) blocks of the row (all heads)
    j = tl.arange(0, QBLOCK)
    mask = (b < n_blocks)[:, None]
    at = b[:, None] * QBLOCK + j[None, :]  # (NB, QBLOCK)
    x = tl.load(src + at, mask=mask, other=0.0).to(tl.float32)
    d = tl.div_rn(tl.max(tl.abs(x), axis=1), 127.0)  # (NB,)
    inv = tl.where(d > 0, tl.div_rn(1.0, tl.where(d > 0, d, 1.0)), 0.0)
    q = _round_half_even(x * inv[:, None])
    tl.store(q_dst + at, q.to(tl.int8), mask=mask)
    tl.store(s_dst + b, d.to(tl.float16), mask=b < n_blocks)


@triton.jit
def _write_q8_kernel(
    k_ptr,
    v_ptr,
    kq_ptr,
    ks_ptr,
    vq_ptr,
    vs_ptr,
    slots_ptr,
    stride_kt,
    stride_vt,
    stride_kqt,
    stride_kst,
    stride_vqt,
    stride_vst,
    K_BLOCKS,
    V_BLOCKS,
    NB_K: tl.constexpr,
    NB_V: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:  # pools viewed as (slots, row): slot s is row s
        _quantize_row(
            k_ptr + t * stride_kt,
            kq_ptr + slot * stride_kqt,
            ks_ptr + slot * stride_kst,
            K_BLOCKS,
            NB_K,
            QBLOCK,
        )
        _quantize_row(
            v_ptr + t * stride_vt,
            vq_ptr + slot * stride_vqt,
            vs_ptr + slot * stride_vst,
            V_BLOCKS,
            NB_V,
            QBLOCK,
        )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(T, H, D) → (T, H·D) with each row contiguous."""
    return x.reshape(x.shape[0], -1).contiguous()


def _check(k, v, k_pool, v_pool, slot_mapping) -> None:
    n = k.shape[0]
    if v.shape[0] != n or slot_mapping.shape != (n,):
        raise ValueError(
            f"k, v and slot_mapping must have the same length; got "
            f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(slot_mapping.shape)}"
        )
    if k_pool.shape[1:] != (PAGE, *k.shape[1:]) or v_pool.shape[1:] != (PAGE, *v.shape[1:]):
        raise ValueError(
            f"pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)} do not hold "
            f"{PAGE}-slot pages of k {tuple(k.shape[1:])} and v {tuple(v.shape[1:])}"
        )
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("the k/v pools must be contiguous (num_blocks, PAGE, n_head_kv, D)")


def kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k (T, n_head_kv, D), v (T, n_head_kv, Dv) → k_pool/v_pool (num_blocks, 16, n_head_kv,
    D|Dv) at slots slot_mapping (T,) int64 (negative: skipped), written in place. With
    k_scale/v_scale (num_blocks, 16, n_head_kv, D/32) float16: int8 pools in q8_0."""
    _check(k, v, k_pool, v_pool, slot_mapping)
    n = k.shape[0]
    if n == 0:
        return
    k2, v2 = _rows(k), _rows(v)
    kd, vd = k2.shape[1], v2.shape[1]
    if k_scale is None:
        _write_kernel[(n,)](
            k2,
            v2,
            k_pool,
            v_pool,
            slot_mapping.contiguous(),
            k2.stride(0),
            v2.stride(0),
            k_pool.stride(0),
            k_pool.stride(1),
            v_pool.stride(0),
            v_pool.stride(1),
            kd,
            vd,
            BLOCK_K=triton.next_power_of_2(kd),
            BLOCK_V=triton.next_power_of_2(vd),
            PAGE=PAGE,
        )
        return
    if (
        v_scale is None
        or k_pool.dtype != torch.int8
        or v_pool.dtype != torch.int8
        or kd % QBLOCK
        or vd % QBLOCK
        or k_scale.shape != (*k_pool.shape[:3], k.shape[2] // QBLOCK)
        or v_scale.shape != (*v_pool.shape[:3], v.shape[2] // QBLOCK)
        or not (k_scale.is_contiguous() and v_scale.is_contiguous())
    ):
        raise ValueError(
            f"a q8_0 pool is int8 (num_blocks, {PAGE}, n_head_kv, D) with "
            f"contiguous float16 scales (num_blocks, {PAGE}, n_head_kv, D/{QBLOCK})"
        )
    kq, ks = k_pool.view(-1, kd), k_scale.view(-1, kd // QBLOCK)
    vq, vs = v_pool.view(-1, vd), v_scale.view(-1, vd // QBLOCK)
    _write_q8_kernel[(n,)](
        k2,
        v2,
        kq,
        ks,
        vq,
        vs,
        slot_mapping.contiguous(),
        k2.stride(0),
        v2.stride(0),
        kq.stride(0),
        ks.stride(0),
        vq.stride(0),
        vs.stride(0),
        kd // QBLOCK,
        vd // QBLOCK,
        NB_K=triton.next_power_of_2(kd // QBLOCK),
        NB_V=triton.next_power_of_2(vd // QBLOCK),
        QBLOCK=QBLOCK,
    )
