"""The native small ops (kernels/native/small_ops.cpp) against their torch definitions."""

from __future__ import annotations

import pytest
import torch

from kernels import native_loader, small_ops


@pytest.fixture(scope="module")
def native():
    module = native_loader.load()
    if module is None:
        pytest.skip("no native build here (no compiler?)")
    return module


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(1, 576), (7, 640), (3, 4, 256)])
def test_rms_norm(native, shape):
    x, w = randn(*shape) * 3, randn(shape[-1], seed=1)
    want = x * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6).float() * w
    # the sum of squares in double, then float32 products: within a few float32 ulps
    torch.testing.assert_close(native.rms_norm(x, w, 1e-6), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
def test_rope(native, neox):
    t, h, d = 5, 3, 64
    x = randn(t, h, d)
    angles = torch.arange(t)[:, None] * 0.1 * torch.arange(1, d // 2 + 1)[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    half = d // 2
    if neox:
        a, b = x[..., :half], x[..., half:]
        want = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        want = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    torch.testing.assert_close(native.rope(x, cos, sin, neox), want, rtol=1e-6, atol=1e-6)


def test_wrappers_fall_back_to_torch_off_the_native_path(native):
    x, w = randn(2, 64).double(), randn(64).double()  # float64: the torch path
    out = small_ops.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    with pytest.raises(RuntimeError):
        native.rms_norm(x.float(), randn(63), 1e-5)
