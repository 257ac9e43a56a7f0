"""The native small ops (kernels/native/small_ops.cpp) against their torch definitions."""

from __future__ import annotations

import pytest
import torch

from kernels import small_ops


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


@pytest.mark.parametrize("shape", [(1, 576), (4, 2048), (3, 4, 256)])
def test_add_rms_norm_is_the_two_ops_bit_for_bit(native, shape):
    x, a, w = randn(*shape), randn(*shape, seed=1), randn(shape[-1], seed=2)
    s, h = small_ops.add_rms_norm(x, a, w, 1e-6)
    assert torch.equal(s, x + a)
    assert torch.equal(h, small_ops.rms_norm(x + a, w, 1e-6))
    # off the native path (float64): torch's ops, the same values
    s64, h64 = small_ops.add_rms_norm(x.double(), a.double(), w.double(), 1e-6)
    torch.testing.assert_close(h64.float(), h, rtol=2e-6, atol=1e-6)
    assert torch.equal(s64, x.double() + a.double())


@pytest.mark.parametrize("n", [1, 7, 8, 9, 5632, 8193])  # vector bodies and scalar tails
def test_silu_mul_against_float64(native, n):
    """|silu(x)·u − exact| ≤ 4e-7·|x|·|u| (|silu(x)| ≤ |x|): float32 rounds the input of exp,
    its result, the division and the product (≤ 2⁻²⁴ relative each) and the exp polynomial
    errs by < 2e-7 relative; torch's own float32 silu reaches 1.5e-7 here."""
    import torch.nn.functional as F

    g, u = randn(3, n, seed=n) * 6, randn(3, n, seed=n + 1)
    exact = F.silu(g.double()) * u.double()
    got = small_ops.act_mul(g, u, False)
    assert got.dtype == torch.float32 and got.shape == g.shape
    err = (got.double() - exact).abs()
    assert (err <= 4e-7 * g.double().abs() * u.double().abs() + 1e-30).all(), err.max()
    big = torch.tensor([[-1e4, -90.0, -88.0, 88.0, 90.0, 1e4, 0.0, -0.0, 1e-30]])
    out = small_ops.act_mul(big, torch.ones_like(big), False)  # the exp's clamp: no inf/nan
    torch.testing.assert_close(out, F.silu(big), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 5632, 8193])
def test_gelu_mul_is_llama_cpps_fp16_table(native, n):
    """GELU as ggml-cpu computes it (GGML_GELU_FP16): the fp16-rounded input's tanh-form
    GELU rounded to fp16, 0 at x ≤ -10, x at x ≥ 10. The native table and the torch form
    (small_ops.gelu_ggml) agree exactly except where tanhf and torch.tanh differ in the last
    float32 bit right at an fp16 rounding boundary: one fp16 ulp (2⁻¹⁰ relative), rarely."""
    g, u = randn(3, n, seed=n) * 6, randn(3, n, seed=n + 1)
    g[0, : min(n, 4)] = torch.tensor([-10.0, 10.0, -9.99, 12.0])[: min(n, 4)]
    got = small_ops.act_mul(g, u, True)
    want = small_ops.gelu_ggml(g) * u
    close = (got - want).abs() <= 2.0**-10 * want.abs() + 1e-30
    assert close.all()
    assert (got == want).float().mean() > 0.99
    # it is within fp16 rounding (plus the table's input rounding) of the exact function
    import torch.nn.functional as F

    exact = F.gelu(g.double(), approximate="tanh") * u.double()
    slope = 1.2 * u.double().abs() * 2.0**-11 * g.double().abs()  # |gelu'| ≤ 1.13
    assert ((got.double() - exact).abs() <= slope + 2.0**-11 * exact.abs() + 1e-12).all()


@pytest.mark.parametrize("neox", [False, True])
def test_rope_qk_is_rope_of_each(native, neox):
    q, k = randn(5, 9, 64), randn(5, 3, 64, seed=1)
    angles = torch.arange(5.0)[:, None, None] * randn(1, 1, 32, seed=2)
    cos, sin = angles.cos(), angles.sin()
    rq, rk = small_ops.rope_qk(q, k, cos, sin, neox)
    assert torch.equal(rq, small_ops.rope(q, cos, sin, neox))
    assert torch.equal(rk, small_ops.rope(k, cos, sin, neox))
