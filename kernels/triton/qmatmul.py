"""qmatmul: y = x · Wᵀ with W in its GGML block format, on the GPU (or Triton's interpreter).

W is the packed weight as stored in the GGUF: (N, row_bytes) uint8, each row K elements in
K/QK blocks (layouts: kernels/triton/ggml_blocks.py). Two kernels read those bytes directly:

- GEMV (decode, M ≤ GEMV_MAX_M rows of x): each program owns BLOCK_N weight rows, walks K a
  tile of blocks at a time, and accumulates x·w products in float32 (memory-bound: the
  arithmetic precision costs nothing).
- GEMM (prefill): (BLOCK_M × BLOCK_N) output tiles; each K step dequantizes a (BLOCK_N, BK)
  weight tile and multiplies it with tl.dot on float16 operands, float32 accumulation (what
  ggml's CUDA back end does for quantized prefill through cuBLAS).

Types without a kernel here (F16, F32, BF16, Q5_1) are dequantized with quant.dequant and
multiplied with torch (F16/F32/BF16 weights are only reinterpreted, not copied; Q5_1, whose
GGUFs are rare, is dequantized whole for the call). Every other type tandem reads (Q4_0,
Q4_1, Q5_0, Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS) has a block function in ggml_blocks.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.triton.ggml_blocks import GEOMETRY, dequant_tile
from quant.dequant import dequantize
from quant.formats import block_format

# Launches pass Python ints/bools to `tl.constexpr` parameters (Triton's convention), which
# pyright reads as instances of the class tl.constexpr: that rule only is off here.
# pyright: reportArgumentType=false

GEMV_MAX_M = 4  # up to this many rows of x use the GEMV kernel


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    row_bytes,
    stride_xm,
    stride_ym,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NB: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) weight rows = outputs
    row_mask = rows < N
    ms = tl.arange(0, BLOCK_M)  # (BM,) rows of x
    m_mask = ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_blocks = K // QK
    for b0 in range(0, n_blocks, NB):
        blk = b0 + tl.arange(0, NB)
        blk_mask = blk < n_blocks
        w = dequant_tile(
            w_ptr, rows, row_mask, row_bytes, blk, blk_mask, QTYPE, QK, TYPE_SIZE, BLOCK_N, NB
        )  # (BN, BK)
        ks = b0 * QK + tl.arange(0, NB * QK)  # (BK,)
        x = tl.load(
            x_ptr + ms[:, None] * stride_xm + ks[None, :],
            mask=m_mask[:, None] & (ks < K)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # (BM, BN)
    tl.store(
        y_ptr + ms[:, None] * stride_ym + rows[None, :],
        acc,
        mask=m_mask[:, None] & row_mask[None, :],
    )


@triton.jit
def _gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    row_bytes,
    stride_xm,
    stride_ym,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NB: tl.constexpr,
):
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    m_mask, row_mask = ms < M, rows < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_blocks = K // QK
    for b0 in range(0, n_blocks, NB):
        blk = b0 + tl.arange(0, NB)
        w = dequant_tile(
            w_ptr, rows, row_mask, row_bytes, blk, blk < n_blocks, QTYPE, QK, TYPE_SIZE, BLOCK_N, NB
        )  # (BN, BK)
        ks = b0 * QK + tl.arange(0, NB * QK)
        x = tl.load(
            x_ptr + ms[:, None] * stride_xm + ks[None, :],
            mask=m_mask[:, None] & (ks < K)[None, :],
            other=0.0,
        )  # (BM, BK)
        acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)  # (BM, BN)
    tl.store(
        y_ptr + ms[:, None] * stride_ym + rows[None, :],
        acc,
        mask=m_mask[:, None] & row_mask[None, :],
    )


def has_kernel(ggml_type: int) -> bool:
    """Whether a Triton kernel reads this GGML type's blocks directly."""
    return int(ggml_type) in GEOMETRY


def _blocks_per_step(qk: int, interpret: bool) -> int:
    """Blocks of a row dequantized per K step: 256 elements on a GPU; the interpreter runs
    faster with fewer, larger steps (its cost is per operation, not per element)."""
    return (1024 if interpret else 256) // qk


def _launch(x: torch.Tensor, weight: torch.Tensor, qtype: int, y: torch.Tensor) -> None:
    (m, k), n = x.shape, weight.shape[0]
    qk, type_size = GEOMETRY[qtype]
    interpret = interpreted()
    nb = _blocks_per_step(qk, interpret)
    args = (x, weight, y, m, n, k, weight.shape[1], x.stride(0), y.stride(0), qtype, qk, type_size)
    if m <= GEMV_MAX_M:
        block_m, block_n = triton.next_power_of_2(m), 64 if interpret else 16
        _gemv_kernel[(triton.cdiv(n, block_n),)](*args, BLOCK_M=block_m, BLOCK_N=block_n, NB=nb)
        return
    block_m = 64 if m >= 64 else max(16, triton.next_power_of_2(m))
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gemm_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, NB=nb)


def _dense(weight: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    """(N, K) float weights of a type without a kernel: float types reinterpreted in place,
    others dequantized (a float32 copy for the duration of the call)."""
    views = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
    if int(ggml_type) in views:
        return weight.view(views[int(ggml_type)]).view(weight.shape[0], k)
    return dequantize(weight, ggml_type)


def qmatmul(
    x: torch.Tensor, weight: torch.Tensor, ggml_type: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (M, K) float · Wᵀ → (M, N) float32, W packed (N, row_bytes) uint8 on x's device."""
    fmt = block_format(ggml_type)  # UnsupportedError for a type tandem cannot read
    if x.dim() != 2 or weight.dim() != 2 or weight.dtype != torch.uint8:
        raise ValueError(
            f"qmatmul wants x (M, K) and a uint8 (N, row_bytes) weight, got "
            f"{tuple(x.shape)} and {tuple(weight.shape)} {weight.dtype}"
        )
    k = x.shape[1]
    if weight.shape[1] != fmt.row_bytes(k):
        raise ValueError(
            f"weight rows of {weight.shape[1]} bytes do not hold {k} {fmt.name} "
            f"elements ({fmt.row_bytes(k)} bytes)"
        )
    if not has_kernel(ggml_type):
        y = x.float() @ _dense(weight, ggml_type, k).float().t()
    else:
        x = x.contiguous()
        y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
        if x.shape[0]:
            _launch(x, weight.contiguous(), int(ggml_type), y)
    return y if bias is None else y + bias
