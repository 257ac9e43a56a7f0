"""The gated delta rule (qwen35's linear attention; the layer around it:
runtime/models/delta_net.py), over B sequences of n new tokens each, every head:

    S ← S·e^{g_t};  d = β_t (v_t − S k_t);  S ← S + d k_tᵀ;  o_t = S q_t / √Dk

Three forms of it here:
- `delta_rule`: token by token, in torch: the plain reference (the tests run it in float64).
- `delta_rule_chunked`: the same, 64 tokens at a time by a triangular solve (the chunked form
  of flash-linear-attention and llama.cpp's build_delta_net_chunking), in torch.
- `delta_rule_states`: what a CPU layer calls. Each sequence's state is its own tensor,
  updated in place: the native kernel (kernels/native/delta_rule.cpp) on float32 CPU
  tensors, which takes a prefill's whole chunks of CHUNK_ALIGN positions in the chunked form
  and the rest (decode steps, a prompt's ragged ends) by rows of S through every token of the
  call; otherwise (TANDEM_NATIVE=0, no build, other dtypes or devices) the torch forms above,
  the chunked one from CHUNKED_FROM tokens on.

q and k come with Hk heads, v with Hv, a multiple of Hk: value head h reads key head h mod Hk.
"""

from __future__ import annotations

import functools

import torch

from kernels import native_loader

CHUNK = 64  # tokens per step of the chunked form
CHUNKED_FROM = 2  # runs of this many new tokens or more take the chunked torch form
# The native kernel's chunks: positions [32c, 32c + 32) of a sequence. A prefill cut into
# calls at multiples of this gives the one-call result bit for bit (runtime/engine/scheduler.py
# cuts recurrent models' prefills so); tests check it equals the build's DELTA_RULE_CHUNK.
CHUNK_ALIGN = 32


def tile_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, Hk, D) → (B, n, heads, D): head h is x's head h mod Hk."""
    return x.repeat(1, 1, heads // x.shape[2], 1)


def delta_rule_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: list[torch.Tensor],
    starts: list[int] | None = None,
) -> torch.Tensor:
    """q, k (B, n, Hk, D), v (B, n, Hv, D), g and beta (B, n, Hv); states: B tensors
    (Hv, D, D), each updated in place to its sequence's state after the n tokens; starts:
    each sequence's position at its first token here (None: 0), where the native kernel's
    chunks fall → o (B, n, Hv, D)."""
    module = _native(q, k, v, g, beta, *states)
    if module is not None:
        return module.delta_rule(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            g.contiguous(),
            beta.contiguous(),
            states,
            starts=list(starts or []),
        )
    heads = v.shape[2]
    rule = delta_rule_chunked if q.shape[1] >= CHUNKED_FROM else delta_rule
    o, s = rule(tile_heads(q, heads), tile_heads(k, heads), v, g, beta, torch.stack(states))
    for j, state in enumerate(states):
        state.copy_(s[j])
    return o


def _native(*tensors: torch.Tensor):
    """The native module when every tensor suits it (CPU, float32), else None."""
    if any(not t.is_cpu or t.dtype != torch.float32 for t in tensors):
        return None
    return _module()


@functools.cache
def _module():
    """The native build, looked up once per process (TANDEM_NATIVE=0: none)."""
    module = native_loader.load() if native_loader.enabled() else None
    return module if module is not None and hasattr(module, "delta_rule") else None


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, token by token: q, k (B, n, H, Dk), v (B, n, H, Dv), g and beta
    (B, n, H), state S (B, H, Dv, Dk) → (o (B, n, H, Dv), the final S)."""
    scale = q.shape[-1] ** -0.5
    out = []
    s = state
    for t in range(q.shape[1]):
        s = s * torch.exp(g[:, t])[..., None, None]
        kt = k[:, t]  # (B, H, Dk)
        d = (v[:, t] - (s @ kt[..., None])[..., 0]) * beta[:, t, :, None]  # (B, H, Dv)
        s = s + d[..., None] * kt[..., None, :]
        out.append((s @ q[:, t, :, :, None])[..., 0] * scale)
    return torch.stack(out, dim=1), s


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta_rule's result, `chunk` tokens at a time (the chunked form flash-linear-attention
    and llama.cpp's build_delta_net_chunking compute). Within a chunk, with G_t = Σ_{j≤t} g_j
    and S0 the state before it, each token's update u_t = β_t (v_t − S'_t k_t) solves the
    unit lower-triangular system
        u_t + β_t Σ_{j<t} e^{G_t−G_j} (k_t·k_j) u_j = β_t (v_t − e^{G_t} S0 k_t)
    and then o_t = (e^{G_t} S0 q_t + Σ_{j≤t} e^{G_t−G_j} (q_t·k_j) u_j) / √Dk and the state
    after it S = e^{G_C} S0 + Σ_j e^{G_C−G_j} u_j k_jᵀ. Shapes as delta_rule's."""
    scale = q.shape[-1] ** -0.5
    out, s = [], state
    for first in range(0, q.shape[1], chunk):
        # (B, H, C, …): this chunk's tokens, heads first
        qc, kc, vc = (x[:, first : first + chunk].transpose(1, 2) for x in (q, k, v))
        gc, bc = (x[:, first : first + chunk].transpose(1, 2) for x in (g, beta))
        cum = gc.cumsum(-1)  # (B, H, C): G_t
        n = cum.shape[-1]
        on_or_below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        # (B, H, C, C): e^{G_t − G_j} for j ≤ t, 0 above (never exp of a positive exponent)
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~on_or_below, -torch.inf).exp()
        grow = cum.exp()[..., None]  # (B, H, C, 1): e^{G_t}
        a = (bc[..., None] * decay * (kc @ kc.transpose(-1, -2))).tril(-1)
        rhs = bc[..., None] * (vc - grow * (kc @ s.transpose(-1, -2)))  # (B, H, C, Dv)
        eye = torch.eye(n, device=q.device, dtype=q.dtype)
        u = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
        qk = (qc @ kc.transpose(-1, -2)) * decay  # (B, H, C, C)
        o = (grow * (qc @ s.transpose(-1, -2)) + qk @ u) * scale  # (B, H, C, Dv)
        last = cum[..., -1:]  # (B, H, 1)
        carry = (last - cum).exp()[..., None] * u  # (B, H, C, Dv): e^{G_C − G_j} u_j
        s = last.exp()[..., None] * s + carry.transpose(-1, -2) @ kc  # (B, H, Dv, Dk)
        out.append(o.transpose(1, 2))
    return torch.cat(out, dim=1), s
