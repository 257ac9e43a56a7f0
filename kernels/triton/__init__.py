"""Triton GPU kernels on GGML blocks and paged KV (they also run in Triton's CPU interpreter
with TRITON_INTERPRET=1, set before this package is imported).

    qmatmul(x, W_packed, ggml_type)          dequant-GEMV (decode) / dequant-GEMM (prefill)
    dequant_rows(W_packed, ids, ggml_type)   embedding rows
    paged_attention_decode(q, k_pool, v_pool, block_tables, context_lens, scale, window)
    kv_write(k, v, k_pool, v_pool, slot_mapping)
    rms_norm(x, weight, eps, residual=None)
"""

from kernels.triton.dequant_rows import dequant_rows
from kernels.triton.kv_write import kv_write
from kernels.triton.paged_attention import PAGE, paged_attention_decode
from kernels.triton.qmatmul import has_kernel, interpreted, qmatmul
from kernels.triton.rms_norm import rms_norm

__all__ = ["PAGE", "dequant_rows", "has_kernel", "interpreted", "kv_write",
           "paged_attention_decode", "qmatmul", "rms_norm"]
