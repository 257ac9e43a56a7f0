"""Triton's grouped expert matmul: y[r] = x[src[r]] · W[expert[r]]ᵀ for packed expert weights
W (E, N, row_bytes) uint8 (MXFP4 or the GGML types of kernels/triton/ggml_blocks.py).

The host sorts the rows by expert and cuts each expert's rows into tiles of up to BLOCK_M; a
program takes one tile and BLOCK_N output rows, dequantizes that expert's weight tile once
in registers and multiplies it with the tile's BLOCK_M inputs, so an expert's weights are
read once per BLOCK_M rows that chose it (once per step for a decode batch of ≤ BLOCK_M).
The tile list is built from the step's routing on the host (a device → host read): a MoE
layer on the GPU is not captured in a CUDA graph.

MXFP4 blocks (quant/mxfp4.py): e (E8M0) | qs[16]; element j = 2^(e − 128) · KVALUES[nib(j)],
the same float operations as quant.mxfp4, so tiles are bit-exact with it.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.triton.ggml_blocks import GEOMETRY, dequant_blocks
from kernels.triton.qmatmul import interpreted

MXFP4 = 39
SUPPORTED = {MXFP4: (32, 17), **GEOMETRY}


@triton.jit
def _mxfp4(base, mask, j):
    """MXFP4 blocks at base (BN, NB, 1) → (BN, NB, 32) float32."""
    e = tl.load(base, mask=mask, other=0).to(tl.int32)
    q = (tl.load(base + 1 + (j % 16), mask=mask, other=0).to(tl.int32) >> ((j // 16) * 4)) & 0xF
    # the doubled E2M1 value of nibble q: magnitudes 0,1,2,3,4,6,8,12, bit 3 the sign
    m = q & 7
    mag = tl.where(m < 5, m, tl.where(m == 5, 6, tl.where(m == 6, 8, 12)))
    v = tl.where(q >= 8, -mag, mag).to(tl.float32)
    bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return tl.where(mask, v * bits.to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _moe_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rows_ptr,  # (R,) output rows, sorted by expert
    src_ptr,  # (R,) input row of each sorted row
    tile_expert_ptr,  # (n_tiles,) expert of each tile
    tile_start_ptr,  # (n_tiles,) first sorted row of each tile
    tile_count_ptr,  # (n_tiles,) its rows (≤ BLOCK_M)
    N,
    K,
    row_bytes,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NB: tl.constexpr,
):
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile)
    count = tl.load(tile_count_ptr + tile)
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < count
    out_rows = tl.load(rows_ptr + start + ms, mask=m_mask, other=0).to(tl.int64)
    in_rows = tl.load(src_ptr + start + ms, mask=m_mask, other=0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output features
    n_mask = ns < N
    w_rows = w_ptr + (e * N + ns.to(tl.int64)) * row_bytes  # (BN,) row starts of expert e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_blocks = K // QK
    for b0 in range(0, n_blocks, NB):
        blk = b0 + tl.arange(0, NB)
        base = w_rows[:, None, None] + (blk * TYPE_SIZE)[None, :, None]  # (BN, NB, 1)
        mask = n_mask[:, None, None] & (blk < n_blocks)[None, :, None]
        if QTYPE == 39:
            w = _mxfp4(base, mask, tl.arange(0, QK)[None, None, :])
        else:
            w = dequant_blocks(base, mask, QTYPE, QK)
        w = tl.reshape(w, (BLOCK_N, NB * QK))
        ks = b0 * QK + tl.arange(0, NB * QK)
        x = tl.load(
            x_ptr + in_rows[:, None] * K + ks[None, :],
            mask=m_mask[:, None] & (ks < K)[None, :],
            other=0.0,
        )  # (BM, BK)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(
        y_ptr + out_rows[:, None] * N + ns[None, :], acc, mask=m_mask[:, None] & n_mask[None, :]
    )


def moe_matmul(
    x: torch.Tensor, w: torch.Tensor, ggml_type: int, src: torch.Tensor, expert: torch.Tensor
) -> torch.Tensor:
    """x (T, K) float32, w (E, N, row_bytes) uint8, src/expert (R,) int64 → y (R, N) float32."""
    qk, type_size = SUPPORTED[int(ggml_type)]
    n_experts, n, row_bytes = w.shape
    k = x.shape[1]
    r = src.shape[0]
    y = torch.empty(r, n, dtype=torch.float32, device=x.device)
    if r == 0:
        return y
    block_m = 16
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=n_experts).tolist()  # the host reads the routing
    tiles_e, tiles_s, tiles_c, at = [], [], [], 0
    for e, c in enumerate(counts):
        for s in range(0, c, block_m):
            tiles_e.append(e)
            tiles_s.append(at + s)
            tiles_c.append(min(block_m, c - s))
        at += c

    def put(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=x.device)

    nb = 1 if interpreted() else max(1, 128 // qk)
    block_n = 32
    grid = (len(tiles_e), triton.cdiv(n, block_n))
    meta: dict[str, Any] = {"QTYPE": int(ggml_type), "QK": qk, "TYPE_SIZE": type_size}
    meta |= {"BLOCK_M": block_m, "BLOCK_N": block_n, "NB": nb}
    _moe_kernel[grid](
        x.float().contiguous(),
        w,
        y,
        order.to(torch.int32),
        src[order].to(torch.int32),
        put(tiles_e),
        put(tiles_s),
        put(tiles_c),
        n,
        k,
        row_bytes,
        **meta,
    )
    return y
