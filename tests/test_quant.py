"""quant/: format table, bit-exact dequantization against gguf-py, quantizer round trips."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quant.dequant import dequantize
from quant.errors import UnsupportedError
from quant.formats import FORMATS, block_format
from quant.quantize import quantize

ALL = [f.name for f in FORMATS.values()]
# Byte offsets of the fp16 scale fields inside one block (ggml-common.h block_* structs).
HALF_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
    "MXFP4": [],  # an E8M0 byte, no fp16 field: every byte pattern is a valid block
}
SHAPES = [(1, 1), (3, 5), (2, 3, 2), (17, 4)]  # leading dims..., blocks per row


def random_blocks(name: str, lead: tuple[int, ...], n_blocks: int, seed: int) -> np.ndarray:
    """Random packed rows (*lead, n_blocks * type_size) whose float fields are all finite."""
    fmt = block_format(T[name])
    rng = np.random.default_rng(seed)
    n = int(np.prod(lead)) * n_blocks
    if name in ("F32", "F16", "BF16"):
        vals = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 4, n)).astype(np.float32)
        raw = {
            "F32": vals,
            "F16": vals.astype(np.float16),
            "BF16": (vals.view(np.uint32) >> 16).astype(np.uint16),
        }[name]
        return raw.view(np.uint8).reshape(*lead, n_blocks * fmt.type_size)
    data = rng.integers(0, 256, (n, fmt.type_size), dtype=np.uint8)
    for at in HALF_FIELDS[name]:  # scales over several magnitudes, both signs, incl. 0
        scale = rng.standard_normal(n) * 10.0 ** rng.uniform(-5, 2, n)
        scale[::7] = 0
        data[:, at : at + 2] = scale.astype(np.float16).view(np.uint8).reshape(n, 2)
    return data.reshape(*lead, n_blocks * fmt.type_size)


def assert_same_bits(got: torch.Tensor, want: np.ndarray) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    g, w = got.contiguous().view(torch.int32).numpy(), want.view(np.int32)
    bad = np.flatnonzero(g.ravel() != w.ravel())
    assert bad.size == 0, (
        f"{bad.size} elements differ, first at {bad[0]}: "
        f"{got.ravel()[bad[0]].item()!r} != {want.ravel()[bad[0]]!r}"
    )


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_gguf_bit_for_bit(name, shape):
    seed = 100 * ALL.index(name) + SHAPES.index(shape)
    data = random_blocks(name, shape[:-1], shape[-1], seed=seed)
    want = gq.dequantize(data, T[name])
    assert_same_bits(dequantize(torch.from_numpy(data), T[name]), want)


@pytest.mark.parametrize("name", ALL)
def test_dequantize_odd_inputs(name):
    """Non-contiguous, misaligned and read-only inputs give the same result, unmodified."""
    fmt = block_format(T[name])
    data = random_blocks(name, (6,), 8, seed=7)
    want = gq.dequantize(data[:, fmt.type_size : 5 * fmt.type_size], T[name])
    wide = torch.from_numpy(data)
    assert_same_bits(dequantize(wide[:, fmt.type_size : 5 * fmt.type_size], T[name]), want)

    shifted = torch.empty(data.size + 1, dtype=torch.uint8)[1:]  # storage offset 1
    shifted.copy_(torch.from_numpy(data).view(-1))
    assert_same_bits(dequantize(shifted.view(6, -1), T[name]), gq.dequantize(data, T[name]))

    frozen = bytes(data.tobytes())
    with warnings.catch_warnings():  # torch warns (once) that the buffer is not writable
        warnings.simplefilter("ignore", UserWarning)
        ro = torch.frombuffer(frozen, dtype=torch.uint8).view(6, -1)
    assert_same_bits(dequantize(ro, T[name]).clone(), gq.dequantize(data, T[name]))
    assert frozen == data.tobytes()


@pytest.mark.parametrize("name", ALL)
def test_dequantize_in_odd_chunks(name, monkeypatch):
    """Chunk boundaries at odd block offsets (misaligned words for 18/22/210-byte blocks)."""
    import quant.dequant

    monkeypatch.setattr(quant.dequant, "CHUNK_ELEMENTS", 3 * block_format(T[name]).block_size)
    data = random_blocks(name, (2,), 7, seed=5)
    assert_same_bits(dequantize(torch.from_numpy(data), T[name]), gq.dequantize(data, T[name]))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_dequantize_on_cuda_matches_gguf(name):
    data = random_blocks(name, (4,), 9, seed=13)
    got = dequantize(torch.from_numpy(data).cuda(), T[name])
    assert got.is_cuda
    assert_same_bits(got.cpu(), gq.dequantize(data, T[name]))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "F32"])
def test_dequantize_into_out(name):
    data = torch.from_numpy(random_blocks(name, (5,), 3, seed=3))
    fmt = block_format(T[name])
    out = torch.full((5, 3 * fmt.block_size), float("nan"))
    assert dequantize(data, T[name], out=out) is out
    assert torch.equal(out, dequantize(data, T[name]))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(data, T[name], out=torch.empty(5, 2))


def test_dequantize_rejects_bad_rows():
    with pytest.raises(ValueError, match="Q4_0"):
        dequantize(torch.zeros(2, 19, dtype=torch.uint8), T.Q4_0)
    with pytest.raises(TypeError):
        dequantize(torch.zeros(2, 18, dtype=torch.int16), T.Q4_0)
    assert dequantize(torch.zeros(0, 36, dtype=torch.uint8), T.Q4_0).shape == (0, 64)


def test_formats_come_from_gguf():
    assert sorted(ALL) == sorted(
        ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
        + ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
        + ["MXFP4"]
    )
    for fmt in FORMATS.values():
        assert (fmt.block_size, fmt.type_size) == gq.GGML_QUANT_SIZES[T[fmt.name]]
        assert fmt.ggml_type == T[fmt.name].value
    assert block_format(T.Q6_K).row_bytes(512) == 420
    assert block_format(T.Q3_K).row_bytes(512) == 220
    assert block_format(T.IQ4_XS).row_bytes(512) == 272
    assert block_format(T.F16).row_bytes(7) == 14


def test_block_format_errors():
    with pytest.raises(UnsupportedError, match=r"IQ2_XXS.*Q4_0.*Q6_K.*IQ4_XS"):
        block_format(T.IQ2_XXS)
    with pytest.raises(UnsupportedError, match="type 999"):
        block_format(999)
    with pytest.raises(UnsupportedError, match="32"):
        block_format(T.Q4_0).row_bytes(48)
    with pytest.raises(UnsupportedError, match="256"):
        block_format(T.Q4_K).row_bytes(4096 + 32)


def test_quantize_errors():
    with pytest.raises(UnsupportedError, match=r"Q4_K.*Q4_0.*Q8_0"):
        quantize(torch.zeros(1, 256), T.Q4_K)
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        quantize(torch.zeros(1, 256), T.IQ2_XXS)
    with pytest.raises(UnsupportedError):
        quantize(torch.zeros(2, 40), T.Q8_0)


def quant_input(seed: int) -> np.ndarray:
    """Rows over several scales, plus blocks that pin the reference's choices: an all-zero
    block, a ± tie for the largest magnitude (the first one found sets the sign of Q4_0's d)
    and exact .5 ties (x/d = k + 0.5, rounded away from zero by Q8_0, up by Q4_0/Q4_1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((9, 128)) * 10.0 ** rng.uniform(-3, 3, (9, 1))
    x[0, :32] = 0
    x[1, :32] = rng.uniform(-1, 1, 32)
    x[1, 3], x[1, 9] = -4.0, 4.0
    x[2, :32] = rng.integers(-127, 127, 32) + 0.5  # Q8_0: d = 127/127 = 1
    x[2, 7] = 127.0
    x[3, :32] = rng.integers(-8, 7, 32) + 0.5  # Q4_0: d = -8/-8 = 1
    x[3, 11] = -8.0
    x[4, :32] = rng.integers(0, 15, 32) + 0.5  # Q4_1: d = (15 - 0)/15 = 1
    x[4, 0], x[4, 1] = 0.0, 15.0
    return x.astype(np.float32)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32"])
def test_quantize_matches_gguf(name):
    x = quant_input(seed=11)
    want = np.ascontiguousarray(gq.quantize(x, T[name])).view(np.uint8)
    got = quantize(torch.from_numpy(x), T[name])
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), want.reshape(got.shape))


def roundtrip_bound(name: str, x: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """Per-element |dequantize(quantize(x)) - x| bound (float64), from the format's math.

    d is the exact float32 scale, d16/m16 the fp16 values stored; the rounding step costs
    d/2, the fp16 rounding of the scale costs |q| * |d16 - d| (|q| ≤ the quant range) and of
    Q4_1's min |m16 - min|. 1e-5 * d covers float32 rounding of x * (1/d) near a .5 tie,
    2**-22 * |x| the float32 rounding of dequantization's product and sum.
    """
    b = x.reshape(-1, 32).astype(np.float64)
    f16 = packed.reshape(b.shape[0], -1)[:, :4].copy().view(np.float16).astype(np.float64)
    if name == "Q8_0":
        d = (np.abs(x.reshape(-1, 32)).max(1, keepdims=True) / np.float32(127)).astype(np.float64)
        bound = d * (0.5 + 1e-5) + 127 * np.abs(f16[:, :1] - d)
    elif name == "Q4_0":
        i = np.abs(b).argmax(1)[:, None]
        d = (np.take_along_axis(x.reshape(-1, 32), i, 1) / np.float32(-8)).astype(np.float64)
        # x/d lies in [-8, 8]; q is clipped at 7, so values with x/d > 7.5 (the opposite sign
        # of the largest, |x| near it) are off by up to (x/d - 7) * |d| ≤ |d|, not |d|/2.
        over = np.maximum(0.5, np.divide(b, d, out=np.zeros_like(b), where=d != 0) - 7)
        bound = np.abs(d) * (over + 1e-5) + 8 * np.abs(f16[:, :1] - d)
    else:  # Q4_1
        lo = x.reshape(-1, 32).min(1, keepdims=True).astype(np.float64)
        d = (x.reshape(-1, 32).max(1, keepdims=True) - lo.astype(np.float32)) / np.float32(15)
        d = d.astype(np.float64)
        bound = d * (0.5 + 1e-5) + 15 * np.abs(f16[:, :1] - d) + np.abs(f16[:, 1:2] - lo)
    bound = np.broadcast_to(bound, b.shape).reshape(x.shape) + 2.0**-22 * np.abs(x)
    return bound + 1e-30  # + tiny: an all-zero block round-trips exactly


def check_roundtrip(name: str, x: np.ndarray) -> None:
    packed = quantize(torch.from_numpy(x), T[name])
    back = dequantize(packed, T[name]).numpy().astype(np.float64)
    err = np.abs(back - x)
    bound = roundtrip_bound(name, x, packed.numpy())
    worst = np.unravel_index(np.argmax(err - bound), x.shape)
    assert (err <= bound).all(), f"{name}: err {err[worst]} > bound {bound[worst]} at {worst}"


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_quantize_roundtrip_within_bound(name):
    check_roundtrip(name, quant_input(seed=5))


@settings(max_examples=100, deadline=None)
@given(
    x=arrays(np.float32, (2, 64), elements=st.floats(-1e3, 1e3, width=32)),
    name=st.sampled_from(["Q4_0", "Q4_1", "Q8_0"]),
)
def test_quantize_roundtrip_property(x, name):
    # A block of only subnormal-sized values gets a scale whose 1/d overflows to inf, and
    # x * inf makes garbage in gguf-py (and ggml's C reference) alike: zero |x| < 1e-2 so
    # every block is either all zero or has a normal-range scale.
    small = np.abs(x) < 1e-2
    x = np.where(small, 0, x).astype(np.float32)
    check_roundtrip(name, x)
    packed = quantize(torch.from_numpy(x), T[name]).numpy()
    np.testing.assert_array_equal(packed, gq.quantize(x, T[name]).reshape(packed.shape))
