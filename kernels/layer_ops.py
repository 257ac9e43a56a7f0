"""LayerOps: the small ops of one layer's forward — RMSNorm, residual add + RMSNorm, RoPE of
q and k together, act(gate)·up, and qwen35's gated delta rule — for the device the layer
runs on.

- CPU layers: kernels/small_ops and kernels/delta_rule (one native call each on float32 CPU
  tensors, torch's ops otherwise).
- GPU layers: kernels/triton's fused kernels, one launch each (where torch would launch five
  to ten kernels per op), all capturable in a CUDA graph; in Triton's CPU interpreter when
  there is no CUDA (tests and CI).

Both sets take and return the same shapes:
    rms_norm(x (..., D), w (D,), eps) → (..., D)
    add_rms_norm(x, a (..., D), w, eps) → (x + a, its norm)
    rope_qk(q (T, H, D), k (T, Hkv, D), cos, sin (T, 1, D/2), neox) → (q, k) rotated
    act_mul(gate, up (M, F), gelu) → act(gate) · up
    delta_rule(q, k (B, n, Hk, D), v (B, n, Hv, D), g, beta (B, n, Hv), states: B tensors
               (Hv, D, D) updated in place, starts: B positions or None) → o (B, n, Hv, D)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from kernels import delta_rule, small_ops


@dataclass(frozen=True)
class LayerOps:
    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    rope_qk: Callable
    act_mul: Callable
    delta_rule: Callable


CPU_OPS = LayerOps(
    "cpu",
    small_ops.rms_norm,
    small_ops.add_rms_norm,
    small_ops.rope_qk,
    small_ops.act_mul,
    delta_rule.delta_rule_states,
)


@functools.cache
def triton_ops() -> LayerOps:
    """The Triton set (importing kernels.triton sets up its interpreter without CUDA)."""
    from kernels import triton as tk

    def rms_norm(x, w, eps):
        return tk.rms_norm(x, w, eps)

    return LayerOps(
        "triton", rms_norm, tk.add_rms_norm, tk.rope_qk, tk.act_mul, tk.delta_rule_states
    )
