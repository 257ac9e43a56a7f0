"""Paged attention for decode: one new query per sequence against its paged keys and values.

KV layout (one layer): k_pool (num_blocks, PAGE, n_head_kv, D) float16, v_pool (num_blocks,
PAGE, n_head_kv, Dv) float16, PAGE = 16 token slots per block; or q8_0 pools: int8 values of
those shapes with float16 scales (num_blocks, PAGE, n_head_kv, D/32), value = q · scale (as
runtime/kv/kv_pool.py reads them). Sequence b's position p
lives in block block_tables[b, p // PAGE] at offset p % PAGE. Its query stands at position
context_lens[b] − 1 and attends to positions 0 … context_lens[b] − 1, or with a sliding
window W only to those at distance < W (ggml's rule, as kernels/attention.py).

One program per (sequence, KV head) serves the GQA group of n_head / n_head_kv query heads
and walks the sequence's blocks with an online softmax (running max and sum, float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launches pass Python ints/bools to `tl.constexpr` parameters (Triton's convention), which
# pyright reads as instances of the class tl.constexpr: that rule only is off here.
# pyright: reportArgumentType=false

PAGE = 16  # token slots per KV block
QBLOCK = 32  # values per float16 scale in a q8_0 pool


@triton.jit
def _page_rows(
    ptr,
    s_ptr,
    block,
    t,
    hk,
    cols,
    visible,
    n_cols,
    stride_b,
    stride_t,
    stride_h,
    sstride_b,
    sstride_t,
    sstride_h,
    QUANT: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    """Rows t (PAGE,) of one KV head in one page → (PAGE, len(cols)) float32; masked slots
    (past the context: they may hold garbage) read 0."""
    mask = visible[:, None] & (cols < n_cols)[None, :]
    x = tl.load(
        ptr + block * stride_b + t[:, None] * stride_t + hk * stride_h + cols[None, :],
        mask=mask,
        other=0,
    ).to(tl.float32)
    if QUANT:
        x *= tl.load(
            s_ptr
            + block * sstride_b
            + t[:, None] * sstride_t
            + hk * sstride_h
            + (cols // QBLOCK)[None, :],
            mask=mask,
            other=0.0,
        ).to(tl.float32)
    return x


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    out_ptr,
    tables_ptr,
    lens_ptr,
    scale,
    window,
    softcap,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ksb,
    stride_kst,
    stride_ksh,
    stride_vsb,
    stride_vst,
    stride_vsh,
    stride_tb,
    stride_ob,
    stride_oh,
    D,
    DV,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr,
    QUANT: tl.constexpr,
    QBLOCK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    sinks_ptr=None,  # (H,) float32 attention sinks (gpt-oss), when HAS_SINKS
    HAS_SINKS: tl.constexpr = False,
):
    b, hk = tl.program_id(0), tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    heads = hk * GROUP + g  # (BG,) query heads of this KV head
    d, dv, t = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, PAGE)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=(g < GROUP)[:, None] & (d < D)[None, :],
        other=0.0,
    ).to(tl.float32)
    q = q * scale  # (BG, BD)
    ctx = tl.load(lens_ptr + b)
    first = tl.maximum(ctx - tl.where(window > 0, window, ctx), 0)  # first visible position
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
    for i in range(first // PAGE, tl.cdiv(ctx, PAGE)):
        block = tl.load(tables_ptr + b * stride_tb + i).to(tl.int64)
        pos = i * PAGE + t  # (PAGE,)
        visible = (pos < ctx) & (pos >= first)
        k = _page_rows(
            k_ptr,
            ks_ptr,
            block,
            t,
            hk,
            d,
            visible,
            D,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_ksb,
            stride_kst,
            stride_ksh,
            QUANT,
            QBLOCK,
        )  # (PAGE, BD)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (BG, PAGE)
        if SOFTCAP:  # cap · tanh(s / cap), tanh(x) = 2σ(2x) − 1
            s = softcap * (2 * tl.sigmoid(2 * s / softcap) - 1)  # pyright: ignore[reportOperatorIssue]
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = _page_rows(
            v_ptr,
            vs_ptr,
            block,
            t,
            hk,
            dv,
            visible,
            DV,
            stride_vb,
            stride_vt,
            stride_vh,
            stride_vsb,
            stride_vst,
            stride_vsh,
            QUANT,
            QBLOCK,
        )  # (PAGE, BDV)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # (BG, BDV)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    if HAS_SINKS:  # a sink logit joins each head's softmax denominator, with no value
        sink = tl.load(sinks_ptr + heads, mask=g < GROUP, other=float("-inf"))
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp(sink - m_new)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + b * stride_ob + heads[:, None] * stride_oh + dv[None, :],
        out,
        mask=(g < GROUP)[:, None] & (dv < DV)[None, :],
    )


def _check(q, k_pool, v_pool, block_tables, context_lens, k_scale, v_scale) -> None:
    bsz, n_head, d = q.shape
    _, page, n_head_kv, dk = k_pool.shape
    if page != PAGE or v_pool.shape[:3] != k_pool.shape[:3] or dk != d:
        raise ValueError(
            f"k/v pools must be (num_blocks, {PAGE}, n_head_kv, D) with D = "
            f"{d}; got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    if n_head % n_head_kv:
        raise ValueError(f"{n_head} query heads are not a multiple of {n_head_kv} KV heads")
    if block_tables.shape[0] != bsz or context_lens.shape != (bsz,):
        raise ValueError(
            f"block_tables (B, max_blocks) and context_lens (B,) must have B = "
            f"{bsz}; got {tuple(block_tables.shape)}, {tuple(context_lens.shape)}"
        )
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the k/v pools must be contiguous in their last dimension")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("give both k_scale and v_scale (a q8_0 pool) or neither")
    if k_scale is not None and (
        k_scale.shape != (*k_pool.shape[:3], d // QBLOCK)
        or k_scale.stride(-1) != 1
        or v_scale.shape != (*v_pool.shape[:3], v_pool.shape[3] // QBLOCK)
        or v_scale.stride(-1) != 1
    ):
        raise ValueError(
            f"q8_0 scales must be (num_blocks, {PAGE}, n_head_kv, D/{QBLOCK}), "
            f"contiguous in the last dimension"
        )


def paged_attention_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int = 0,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """sinks: (n_head,) float32 per-head sink logits (gpt-oss), or None.
    q (B, n_head, D), pools (num_blocks, 16, n_head_kv, D|Dv) f16 (or int8 with k_scale,
    v_scale: a q8_0 pool), block_tables (B, max_blocks) and context_lens (B,) int32 or
    int64, each length ≥ 1 → (B, n_head, Dv) float32. window 0: no sliding window; softcap
    0: no soft-capping."""
    _check(q, k_pool, v_pool, block_tables, context_lens, k_scale, v_scale)
    bsz, n_head, d = q.shape
    n_head_kv, dv = k_pool.shape[2], v_pool.shape[3]
    group = n_head // n_head_kv
    out = torch.empty(bsz, n_head, dv, dtype=torch.float32, device=q.device)
    tables = block_tables.contiguous()
    if k_scale is not None and v_scale is not None:  # a q8_0 pool (_check: both or neither)
        quant, ks, vs = True, k_scale, v_scale
    else:
        quant, ks, vs = False, k_pool, v_pool  # unread when not quant
    _decode_kernel[(bsz, n_head_kv)](
        q,
        k_pool,
        v_pool,
        ks,
        vs,
        out,
        tables,
        context_lens.contiguous(),
        float(scale),
        int(window),
        float(softcap),
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        ks.stride(0),
        ks.stride(1),
        ks.stride(2),
        vs.stride(0),
        vs.stride(1),
        vs.stride(2),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        d,
        dv,
        GROUP=group,
        BLOCK_G=triton.next_power_of_2(group),
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_DV=triton.next_power_of_2(dv),
        PAGE=PAGE,
        QUANT=quant,
        QBLOCK=QBLOCK,
        SOFTCAP=bool(softcap),
        sinks_ptr=sinks.float().contiguous() if sinks is not None else None,
        HAS_SINKS=sinks is not None,
    )
    return out
