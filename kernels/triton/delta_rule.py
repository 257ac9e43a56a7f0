"""The gated delta rule (kernels/delta_rule.py has its math and torch forms) for GPU layers,
in two forms, both over B sequences × Hv heads × blocks of state rows. Row j of a head's
state S (Dv, Dk) meets only v_t[j] and o_t[j], so a program holds its block of rows in
registers through all its tokens and reads and writes S once per launch:

- the fused recurrent form (flash-linear-attention's), token by token: decode steps, and the
  tokens of a prefill outside whole chunks;
- the chunked form, CHUNK tokens per step (the WY form of kernels/native/delta_rule.cpp,
  whose header has the math: a triangular solve over the chunk, then products with S₀ and
  with U), its products as tl.dot in IEEE float32: a prefill's whole chunks.

Chunks are positions [32c, 32c + 32) of the sequence (`starts`), as in the native kernel, so
a prefill cut at multiples of 32 computes each token the same way in any cut. Without
starts, or with no whole chunk in the call, it is one recurrent launch (a decode step:
capturable in a CUDA graph). Float32 throughout.

    delta_rule(q, k, v, g, beta, state, starts)   state (B, Hv, Dv, Dk) updated in place → o
    delta_rule_states(q, k, v, g, beta, states, starts)  B states (Hv, Dv, Dk), each in place

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
CHUNK = 32  # tokens per step of the chunked form (kernels/delta_rule.py CHUNK_ALIGN)


@triton.jit
def _delta_rule_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    s_ptr,
    o_ptr,
    spans_ptr,
    n,
    HK,
    HV,
    D,
    scale,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SPANS: tl.constexpr,
):
    """Tokens [0, n) of each sequence, or (HAS_SPANS) sequence b's [spans[2b], spans[2b+1])."""
    bh = tl.program_id(0)  # sequence b = bh // HV, value head h = bh % HV
    b, h = bh // HV, bh % HV
    rows = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # (BV,)
    cols = tl.arange(0, BLOCK_K)  # (BK,)
    row_ok, col_ok = rows < D, cols < D
    both = row_ok[:, None] & col_ok[None, :]
    s_at = s_ptr + bh.to(tl.int64) * D * D + rows[:, None] * D + cols[None, :]
    s = tl.load(s_at, mask=both, other=0.0)  # (BV, BK): this block of S's rows
    if HAS_SPANS:
        first, last = tl.load(spans_ptr + 2 * b), tl.load(spans_ptr + 2 * b + 1)
    else:
        first, last = 0, n
    for t in range(first, last):
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


@triton.jit
def _chunked_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    s_ptr,
    o_ptr,
    spans_ptr,
    n,
    HK,
    HV,
    D,
    scale,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    C: tl.constexpr,
):
    """Sequence b's whole chunks [spans[2b], spans[2b+1]) (a multiple of C tokens), C at a
    time; this program's BLOCK_V rows of S (value dims: independent through the rule)."""
    bh = tl.program_id(0)
    b, h = bh // HV, bh % HV
    hk = h % HK
    rows = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # (BV,) value dims
    cols = tl.arange(0, BLOCK_K)  # (BK,) key dims
    tok = tl.arange(0, C)  # (C,) tokens of a chunk
    row_ok, col_ok = rows < D, cols < D
    both = row_ok[:, None] & col_ok[None, :]
    s_at = s_ptr + bh.to(tl.int64) * D * D + rows[:, None] * D + cols[None, :]
    s = tl.load(s_at, mask=both, other=0.0)  # (BV, BK): S₀'s rows, chunk by chunk
    upto = tok[:, None] >= tok[None, :]  # (C, C): j ≤ i
    before = tok[:, None] > tok[None, :]  # j < i
    first, last = tl.load(spans_ptr + 2 * b), tl.load(spans_ptr + 2 * b + 1)
    for c0 in range(first, last, C):
        bt = (b * n + c0 + tok).to(tl.int64)  # (C,)
        key = (bt[:, None] * HK + hk) * D + cols[None, :]
        kc = tl.load(k_ptr + key, mask=col_ok[None, :], other=0.0).to(tl.float32)  # (C, BK)
        qc = tl.load(q_ptr + key, mask=col_ok[None, :], other=0.0).to(tl.float32)
        val = (bt[:, None] * HV + h) * D + rows[None, :]
        vc = tl.load(v_ptr + val, mask=row_ok[None, :], other=0.0).to(tl.float32)  # (C, BV)
        gc = tl.load(g_ptr + bt * HV + h).to(tl.float32)  # (C,)
        bc = tl.load(beta_ptr + bt * HV + h).to(tl.float32)
        G = tl.cumsum(gc, axis=0)  # G_i = g_1 + … + g_i
        decay = tl.exp(tl.where(upto, G[:, None] - G[None, :], float("-inf")))  # e^{G_i−G_j}
        kk = tl.dot(kc, tl.trans(kc), input_precision="ieee")  # (C, C)
        neg_a = tl.where(before, -bc[:, None] * decay * kk, 0.0)  # −A_ij, j < i
        # T = (I + A)⁻¹, unit lower-triangular, row by row: T_i = e_i − Σ_{j<i} A_ij T_j
        t_inv = tl.where(tok[:, None] == tok[None, :], 1.0, 0.0)
        for i in range(1, C):
            a_i = tl.sum(tl.where(tok[:, None] == i, neg_a, 0.0), axis=0)  # (C,): −row i of A
            row = tl.where(tok == i, 1.0, tl.sum(a_i[:, None] * t_inv, axis=0))
            t_inv = tl.where(tok[:, None] == i, row[None, :], t_inv)
        gamma = tl.exp(G)
        w = tl.dot(t_inv, kc * (bc * gamma)[:, None], input_precision="ieee")  # (C, BK)
        u = tl.dot(t_inv, vc * bc[:, None], input_precision="ieee")  # (C, BV): Ũ
        u -= tl.dot(w, tl.trans(s), input_precision="ieee")  # u_i = ũ_i − S₀ w_i
        qk = tl.dot(qc, tl.trans(kc), input_precision="ieee")
        p = tl.where(upto, decay * qk, 0.0)
        o = tl.dot(qc * gamma[:, None], tl.trans(s), input_precision="ieee")
        o = (o + tl.dot(p, u, input_precision="ieee")) * scale
        tl.store(o_ptr + val, o, mask=row_ok[None, :])
        g_last = tl.sum(tl.where(tok == C - 1, G, 0.0), axis=0)
        u *= tl.exp(g_last - G)[:, None]  # e^{G_L−G_j} u_j
        s = s * tl.exp(g_last) + tl.dot(tl.trans(u), kc, input_precision="ieee")
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
    starts: list[int] | None = None,
) -> torch.Tensor:
    """state (B, Hv, D, D) float32, updated in place; starts: each sequence's position at its
    first token here (None: one recurrent launch) → o (B, n, Hv, D) float32."""
    _check(q, k, v, g, beta, state)
    b, n, hk, d = q.shape
    hv = v.shape[2]
    o = torch.empty(b, n, hv, d, dtype=torch.float32, device=v.device)
    if not (b and n and d):
        return o
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    args = (q, k, v, g, beta, state, o)
    common = dict(BLOCK_V=BLOCK_V, BLOCK_K=triton.next_power_of_2(d))
    grid = (b * hv, triton.cdiv(d, BLOCK_V))
    spans = _spans(starts, b, n)
    if spans is None:  # no whole chunk: every token by the recurrence
        _delta_rule_kernel[grid](*args, o, n, hk, hv, d, d**-0.5, HAS_SPANS=False, **common)
        return o
    lead, whole, tail = (torch.tensor(x, dtype=torch.int32, device=v.device) for x in spans)
    _delta_rule_kernel[grid](*args, lead, n, hk, hv, d, d**-0.5, HAS_SPANS=True, **common)
    _chunked_kernel[grid](*args, whole, n, hk, hv, d, d**-0.5, C=CHUNK, **common)
    _delta_rule_kernel[grid](*args, tail, n, hk, hv, d, d**-0.5, HAS_SPANS=True, **common)
    return o


def _spans(starts: list[int] | None, b: int, n: int) -> tuple[list[int], ...] | None:
    """Per sequence the token spans (flat [first, last) pairs) of the lead before its first
    whole chunk, of its whole chunks and of the tail after; None when no sequence has a whole
    chunk (or starts is None)."""
    if starts is None:
        return None
    if len(starts) != b or any(x < 0 for x in starts):
        raise ValueError(f"delta_rule: starts must be {b} positions ≥ 0, got {starts}")
    if n < CHUNK:
        return None
    lead = [min(n, -x % CHUNK) for x in starts]
    end = [a + (n - a) // CHUNK * CHUNK for a in lead]
    if all(e == a for a, e in zip(lead, end, strict=True)):
        return None
    flat = [
        [y for pair in zip(xs, ys, strict=True) for y in pair]
        for xs, ys in (([0] * b, lead), (lead, end), (end, [n] * b))
    ]
    return tuple(flat)


def delta_rule_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: list[torch.Tensor],
    starts: list[int] | None = None,
) -> torch.Tensor:
    """As delta_rule, with B states (Hv, D, D) apart, each updated in place."""
    stacked = torch.stack(states)
    o = delta_rule(q, k, v, g, beta, stacked, starts)
    for j, state in enumerate(states):
        state.copy_(stacked[j])
    return o
