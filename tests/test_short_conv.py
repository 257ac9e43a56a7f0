"""The delta net's conv1d + silu + q/k L2 norm (kernels/short_conv.py), native and torch,
against the formula written out in float64: the K taps over each sequence's held window
and new mixes, silu, split, q and k normalised per head. Float32 against float64: within
1e-5 of the largest value (measured about 1e-7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import native_loader
from kernels import short_conv as sc


def reference(x, taps, hk, hv, d, eps):
    """x (B, K-1+n, C), taps (K, C), float64 → q, k, v as the layer's first torch form."""
    width = taps.shape[0]
    y = F.silu((x.unfold(1, width, 1) * taps.t()).sum(-1))  # (B, n, C)
    b, n = y.shape[:2]
    q, k, v = y.split([hk * d, hk * d, hv * d], dim=-1)

    def l2(t):
        t = t.reshape(b, n, hk, d)
        return t / torch.sqrt((t * t).sum(-1, keepdim=True) + eps)

    return l2(q), l2(k), v.reshape(b, n, hv, d)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("b,n,hk,hv,d", [(1, 1, 2, 4, 128), (3, 1, 1, 2, 12), (2, 37, 2, 2, 32)])
def test_short_conv_is_the_formula(b, n, hk, hv, d, native, monkeypatch):
    if native:
        if not native_loader.available():
            pytest.skip("the native CPU kernel is not built")
        assert sc._module() is not None
    else:
        monkeypatch.setattr(sc, "_module", lambda: None)
    gen = torch.Generator().manual_seed(n)
    c, width, eps = (2 * hk + hv) * d, 4, 1e-6
    x = torch.randn(b, width - 1 + n, c, generator=gen, dtype=torch.float64)
    taps = torch.randn(width, c, generator=gen, dtype=torch.float64)
    want = reference(x, taps, hk, hv, d, eps)
    got = sc.short_conv(x.float(), taps.float(), hk, hv, d, eps)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.shape == w.shape and g.dtype == torch.float32
        err = (g.double() - w).abs().max().item()
        assert err <= 1e-5 * w.abs().max().item(), f"{name}: {err:.3g}"
