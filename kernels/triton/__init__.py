"""Triton GPU kernels on GGML blocks and paged KV. Without a CUDA device they run in Triton's
CPU interpreter: importing this package then sets TRITON_INTERPRET=1 unless it is set
already. Triton reads it when it first defines its own library (tl.zeros, tl.sum…), so it
must be set before the first `import triton` anywhere in the process; if triton came first,
a warning says so (kernel launches would then fail).

    qmatmul(x, W_packed, ggml_type)          dequant-GEMV (decode) / dequant-GEMM (prefill)
    dequant_rows(W_packed, ids, ggml_type)   embedding rows
    paged_attention_decode(q, k_pool, v_pool, block_tables, context_lens, scale, window)
    kv_write(k, v, k_pool, v_pool, slot_mapping)
    rms_norm(x, weight, eps, residual=None)
    add_rms_norm(x, a, weight, eps)          (x + a, rms_norm(x + a)), out of place
    rope_qk(q, k, cos, sin, neox)            RoPE of q and k in one launch
    act_mul(gate, up, gelu)                  silu(gate)·up or tanh-GELU(gate)·up
    delta_rule_states(q, k, v, g, beta, states)  the gated delta rule, states in place
"""

import os
import sys
import warnings

import torch


def _interpret_without_cuda() -> None:
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    if "triton" in sys.modules:
        warnings.warn(
            "triton was imported before TRITON_INTERPRET was set and there is no "
            "CUDA device: set TRITON_INTERPRET=1 in the environment to run "
            "tandem's Triton kernels in the interpreter",
            stacklevel=3,
        )
    os.environ["TRITON_INTERPRET"] = "1"


_interpret_without_cuda()

from kernels.triton.act_mul import act_mul  # noqa: E402
from kernels.triton.delta_rule import delta_rule_states  # noqa: E402
from kernels.triton.dequant_rows import dequant_rows  # noqa: E402
from kernels.triton.kv_write import kv_write  # noqa: E402
from kernels.triton.paged_attention import PAGE, paged_attention_decode  # noqa: E402
from kernels.triton.qmatmul import has_kernel, interpreted, qmatmul  # noqa: E402
from kernels.triton.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from kernels.triton.rope import rope_qk  # noqa: E402

__all__ = [
    "PAGE",
    "act_mul",
    "delta_rule_states",
    "add_rms_norm",
    "dequant_rows",
    "has_kernel",
    "interpreted",
    "kv_write",
    "paged_attention_decode",
    "qmatmul",
    "rms_norm",
    "rope_qk",
]
