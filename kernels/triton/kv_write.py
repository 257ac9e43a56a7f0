"""kv_write: store new keys and values into their paged slots.

Slot `s` of a layer's pool (num_blocks, PAGE, n_head_kv, D) is block s // PAGE, offset
s % PAGE (slot_mapping comes from the block tables: block * PAGE + offset). A negative slot
marks a padding row and is skipped. Values are converted to the pool's dtype (float16,
round to nearest even) on the way in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.paged_attention import PAGE


@triton.jit
def _write_kernel(k_ptr, v_ptr, kp_ptr, vp_ptr, slots_ptr, stride_kt, stride_vt,
                  stride_kpb, stride_kpt, stride_vpb, stride_vpt,
                  KD, VD, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PAGE: tl.constexpr):
    t = tl.program_id(0)  # one new token per program
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        block, off = slot // PAGE, slot % PAGE
        ik, iv = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_V)  # over n_head_kv · D
        k = tl.load(k_ptr + t * stride_kt + ik, mask=ik < KD)
        tl.store(kp_ptr + block * stride_kpb + off * stride_kpt + ik,
                 k.to(kp_ptr.dtype.element_ty), mask=ik < KD)
        v = tl.load(v_ptr + t * stride_vt + iv, mask=iv < VD)
        tl.store(vp_ptr + block * stride_vpb + off * stride_vpt + iv,
                 v.to(vp_ptr.dtype.element_ty), mask=iv < VD)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(T, H, D) → (T, H·D) with each row contiguous."""
    return x.reshape(x.shape[0], -1).contiguous()


def kv_write(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k (T, n_head_kv, D), v (T, n_head_kv, Dv) → k_pool/v_pool (num_blocks, 16, n_head_kv,
    D|Dv) at slots slot_mapping (T,) int64 (negative: skipped). Pools are written in place."""
    n = k.shape[0]
    if v.shape[0] != n or slot_mapping.shape != (n,):
        raise ValueError(f"k, v and slot_mapping must have the same length; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(slot_mapping.shape)}")
    if k_pool.shape[1:] != (PAGE, *k.shape[1:]) or v_pool.shape[1:] != (PAGE, *v.shape[1:]):
        raise ValueError(f"pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)} do not hold "
                         f"{PAGE}-slot pages of k {tuple(k.shape[1:])} and v {tuple(v.shape[1:])}")
    if not (k_pool[0, 0].is_contiguous() and v_pool[0, 0].is_contiguous()):
        raise ValueError("each slot of the k/v pools must be contiguous (n_head_kv, D)")
    if n == 0:
        return
    k2, v2 = _rows(k), _rows(v)
    kd, vd = k2.shape[1], v2.shape[1]
    _write_kernel[(n,)](k2, v2, k_pool, v_pool, slot_mapping.contiguous(), k2.stride(0),
                        v2.stride(0), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0),
                        v_pool.stride(1), kd, vd, BLOCK_K=triton.next_power_of_2(kd),
                        BLOCK_V=triton.next_power_of_2(vd), PAGE=PAGE)
