"""dequant_rows: selected rows of a packed GGML weight → float32, on the GPU (an embedding
lookup on packed token_embd), bit-exact with quant.dequant.dequantize."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.ggml_blocks import GEOMETRY, dequant_tile
from kernels.triton.qmatmul import interpreted

# Launches pass Python ints/bools to `tl.constexpr` parameters (Triton's convention), which
# pyright reads as instances of the class tl.constexpr: that rule only is off here.
# pyright: reportArgumentType=false


@triton.jit
def _rows_kernel(
    w_ptr,
    ids_ptr,
    out_ptr,
    K,
    row_bytes,
    stride_out,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    NB: tl.constexpr,
):
    t = tl.program_id(0)  # one output row per program
    row = tl.load(ids_ptr + t + tl.arange(0, 1))  # (1,) the weight row to unpack
    n_blocks = K // QK
    for b0 in range(0, n_blocks, NB):
        blk = b0 + tl.arange(0, NB)
        w = dequant_tile(
            w_ptr, row, row >= 0, row_bytes, blk, blk < n_blocks, QTYPE, QK, TYPE_SIZE, 1, NB
        )  # (1, NB·QK)
        ks = b0 * QK + tl.arange(0, NB * QK)
        tl.store(out_ptr + t * stride_out + ks[None, :], w, mask=(ks < K)[None, :])


def dequant_rows(weight: torch.Tensor, ids: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """weight (N, row_bytes) uint8, ids (T,) int → (T, K) float32 rows `ids` of W."""
    qk, type_size = GEOMETRY[int(ggml_type)]
    k = weight.shape[1] // type_size * qk
    out = torch.empty(ids.shape[0], k, dtype=torch.float32, device=weight.device)
    if ids.numel():
        nb = max(1, (1024 if interpreted() else 256) // qk)
        _rows_kernel[(ids.shape[0],)](
            weight.contiguous(),
            ids.to(torch.int64).contiguous(),
            out,
            k,
            weight.shape[1],
            out.stride(0),
            int(ggml_type),
            qk,
            type_size,
            NB=nb,
        )
    return out
