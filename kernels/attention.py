"""Causal attention over one sequence's cached keys and values (CPU reference path).

Queries at positions start … start+T-1 attend to keys 0 … start+T-1, except that a
sliding-window layer masks keys whose distance from the query is ≥ window (ggml's rule).
Grouped-query attention: each of the n_head_kv heads serves n_head / n_head_kv query heads.
With a soft-cap c (gemma2) the scaled scores s become c · tanh(s / c) before the mask and
softmax (llama.cpp's build_attn_mha); with sinks (gpt-oss) each head's softmax has one more
logit, sinks[h], that carries no value. SDPA does neither, so those layers take `_explicit`.

The native paged-KV kernels (kernels/native/paged_attention.cpp) are reached from here too:
decode attention straight from the f16 pages, and the write of new keys and values into them.
"""

import functools

import torch
import torch.nn.functional as F

from kernels import native_loader


def causal_mask(
    start: int, n_query: int, n_key: int, window: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """(T, L) boolean mask on `device`, True where attention is allowed; None when nothing
    is masked."""
    if n_query == 1 and (window == 0 or n_key <= window):
        return None
    q_pos = torch.arange(start, start + n_query, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(n_key, device=device)[None, :]  # (1, L)
    allowed = k_pos <= q_pos
    if window:
        allowed &= (q_pos - k_pos) < window
    return allowed


def _explicit(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    cap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA's math written out, with soft-capped scores (cap) and/or a sink logit per head:
    q (B, H, T, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv), mask broadcastable to (B, H, T, L)
    (True: allowed), sinks (H,) → (B, H, T, Dv)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = q @ k.transpose(-1, -2) * scale  # (B, H, T, L)
    if cap:
        s = cap * torch.tanh(s / cap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.softmax(s, dim=-1) @ v
    sink = sinks.view(1, -1, 1, 1).expand(*s.shape[:-1], 1).to(s.dtype)
    p = torch.softmax(torch.cat((s, sink), -1), -1)  # (B, H, T, L + 1)
    return p[..., :-1] @ v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    window: int,
    scale: float,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    # q: (T, H, D), k: (L, Hkv, D), v: (L, Hkv, Dv), sinks (H,) or None → (T, H * Dv)
    n_query, n_key = q.shape[0], k.shape[0]
    mask = causal_mask(start, n_query, n_key, window, q.device)
    if softcap or sinks is not None:
        qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))
        out = _explicit(qt, kt, vt, mask, scale, softcap, sinks)  # (1, H, T, Dv)
        return out[0].transpose(0, 1).reshape(n_query, -1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # (1, H, T, Dv)
    return out[0].transpose(0, 1).reshape(n_query, -1)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence over padded contexts, in one call.
    q: (B, H, D), k: (B, L, Hkv, D), v: (B, L, Hkv, Dv), mask: (B, 1, 1, L) → (B, H * Dv)"""
    if softcap or sinks is not None:
        qt, kt, vt = q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2)
        out = _explicit(qt, kt, vt, mask, scale, softcap, sinks)
        return out.reshape(q.shape[0], -1)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[2],
    )  # (B, H, 1, Dv)
    return out.reshape(q.shape[0], -1)


def paged_decode_attention(
    q: torch.Tensor,
    k_slab: torch.Tensor,
    v_slab: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One query per sequence straight from the f16 pages, by the native kernel
    (kernels/native/paged_attention.cpp): batch-invariant, no gather or padding. None when the
    native build is unavailable, the tensors are not CPU ones, or the scores are soft-capped
    (the kernel does not cap them: the caller then gathers). sinks (H,): gpt-oss's extra logit.
    q: (B, H, D), slabs: (slots, Hkv, D|Dv), tables: (B, max_blocks) int32, lengths: (B,)
    → (B, H * Dv)"""
    module = _native_module()
    if module is None or q.device.type != "cpu" or k_slab.device.type != "cpu" or softcap:
        return None
    return module.paged_decode_attention(
        q.float(), k_slab, v_slab, tables, lengths.long(), scale, window, sinks
    )


def kv_write_f16(
    k: torch.Tensor,
    v: torch.Tensor,
    k_slab: torch.Tensor,
    v_slab: torch.Tensor,
    slots: torch.Tensor,
) -> bool:
    """New keys and values into their f16 slab rows by the native kernel, in one call: k
    (T, Hkv, D), v (T, Hkv, Dv) float32, slabs (slots, Hkv, D|Dv) float16, slots (T,) int64
    (negative: skipped). False when the native build is unavailable or a tensor is not a
    float32 CPU one (the caller then writes with torch)."""
    module = _native_module()
    if (
        module is None
        or not (k.is_cpu and k_slab.is_cpu and slots.is_cpu)
        or k.dtype != torch.float32
        or v.dtype != torch.float32
    ):
        return False
    module.kv_write_f16(k, v, k_slab, v_slab, slots)
    return True


@functools.cache
def _native_module():
    if not native_loader.enabled():
        return None
    module = native_loader.load()
    return module if module is not None and hasattr(module, "paged_decode_attention") else None
