"""MXFP4 blocks: quant/mxfp4.py's dequantizer against gguf-py's reference, bit for bit."""

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from quant.dequant import dequantize
from quant.formats import block_format


def _random_rows(rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, blocks, 17), dtype=np.uint8)
    data[0, : min(blocks, 256), 0] = np.arange(min(blocks, 256))  # every scale byte, 0..255
    return data.reshape(rows, blocks * 17)


def test_geometry_is_gguf_py_s():
    fmt = block_format(int(T.MXFP4))
    assert (fmt.block_size, fmt.type_size) == (32, 17)


def test_dequantize_bit_exact_with_gguf_py():
    data = _random_rows(4, 300)
    want = quants.dequantize(data, T.MXFP4)  # (4, 9600) float32
    got = dequantize(torch.from_numpy(data), int(T.MXFP4))
    assert got.shape == (4, 300 * 32)
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))


def test_quantized_values_round_trip():
    """gguf-py's quantizer's output dequantizes to what gguf-py says (non-random bytes)."""
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    packed = quants.quantize(x, T.MXFP4)
    got = dequantize(torch.from_numpy(packed), int(T.MXFP4)).numpy()
    assert np.array_equal(got, quants.dequantize(packed, T.MXFP4))
    assert np.abs(got - x).max() < 0.5 * np.abs(x).max()  # a quantization, not noise
