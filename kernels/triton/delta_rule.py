"""The gated delta rule (kernels/delta_rule.py has its math and torch forms) for GPU layers:
one launch over B sequences × Hv heads × blocks of BLOCK_V state rows. Row j of a head's
state S (Dv, Dk) meets only v_t[j] and o_t[j], so a program holds its block of rows in
registers through all n tokens (the fused recurrent form of flash-linear-attention), and
reads and writes S once per call: a decode step (n = 1) and a prefill alike, float32.

    delta_rule(q, k, v, g, beta, state)          state (B, Hv, Dv, Dk) updated in place → o
    delta_rule_states(q, k, v, g, beta, states)  B states (Hv, Dv, Dk), each updated in place

q, k (B, n, Hk, D), v (B, n, Hv, D), g and beta (B, n, Hv) → o (B, n, Hv, D); value head h
reads key head h mod Hk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launches pass Python ints to `tl.constexpr` parameters (Triton's convention), which
# pyright reads as instances of the class tl.constexpr: that rule only is off here.
# pyright: reportArgumentType=false

BLOCK_V = 32  # state rows per program


@triton.jit
def _delta_rule_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    s_ptr,
    o_ptr,
    n,
    HK,
    HV,
    D,
    scale,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    bh = tl.program_id(0)  # sequence b = bh // HV, value head h = bh % HV
    b, h = bh // HV, bh % HV
    rows = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # (BV,)
    cols = tl.arange(0, BLOCK_K)  # (BK,)
    row_ok, col_ok = rows < D, cols < D
    both = row_ok[:, None] & col_ok[None, :]
    s_at = s_ptr + bh.to(tl.int64) * D * D + rows[:, None] * D + cols[None, :]
    s = tl.load(s_at, mask=both, other=0.0)  # (BV, BK): this block of S's rows
    for t in range(0, n):
        bt = (b * n + t).to(tl.int64)
        key = (bt * HK + h % HK) * D
        k = tl.load(k_ptr + key + cols, mask=col_ok, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + key + cols, mask=col_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (bt * HV + h) * D + rows, mask=row_ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + bt * HV + h).to(tl.float32)
        beta = tl.load(beta_ptr + bt * HV + h).to(tl.float32)
        s = s * tl.exp(g)
        d = beta * (v - tl.sum(s * k[None, :], axis=1))  # (BV,)
        s = s + d[:, None] * k[None, :]
        o = tl.sum(s * q[None, :], axis=1) * scale
        tl.store(o_ptr + (bt * HV + h) * D + rows, o, mask=row_ok)
    tl.store(s_at, s, mask=both)


def _check(q, k, v, g, beta, state) -> None:
    b, n, hk, d = q.shape
    hv = v.shape[2]
    shapes = {
        "k": (k, (b, n, hk, d)),
        "v": (v, (b, n, hv, d)),
        "g": (g, (b, n, hv)),
        "beta": (beta, (b, n, hv)),
        "state": (state, (b, hv, d, d)),
    }
    for name, (x, want) in shapes.items():
        if tuple(x.shape) != want:
            raise ValueError(f"delta_rule: {name} is {tuple(x.shape)}, wanted {want}")
    if hk == 0 or hv % hk:
        raise ValueError(f"delta_rule: Hv ({hv}) must be a multiple of Hk ({hk})")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("delta_rule: the state must be contiguous float32")


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """state (B, Hv, D, D) float32, updated in place → o (B, n, Hv, D) float32."""
    _check(q, k, v, g, beta, state)
    b, n, hk, d = q.shape
    hv = v.shape[2]
    o = torch.empty(b, n, hv, d, dtype=torch.float32, device=v.device)
    if b and n and d:
        grid = (b * hv, triton.cdiv(d, BLOCK_V))
        _delta_rule_kernel[grid](
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            g.contiguous(),
            beta.contiguous(),
            state,
            o,
            n,
            hk,
            hv,
            d,
            d**-0.5,
            BLOCK_V=BLOCK_V,
            BLOCK_K=triton.next_power_of_2(d),
        )
    return o


def delta_rule_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: list[torch.Tensor],
    starts: list[int] | None = None,
) -> torch.Tensor:
    """As delta_rule, with B states (Hv, D, D) apart, each updated in place (starts: the
    sequences' positions, unused: every token takes the one recurrence)."""
    stacked = torch.stack(states)
    o = delta_rule(q, k, v, g, beta, stacked)
    for j, state in enumerate(states):
        state.copy_(stacked[j])
    return o
