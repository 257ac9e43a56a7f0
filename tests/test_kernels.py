"""The CPU reference kernels against naive formulas on random inputs."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from kernels.attention import attention, causal_mask
from kernels.linear import PackedLinear
from kernels.norm import rms_norm
from kernels.rope import Rope
from quant.dequant import dequantize
from quant.quantize import quantize

torch.manual_seed(0)


def naive_rope(x: torch.Tensor, pos: torch.Tensor, base: float, neox: bool) -> torch.Tensor:
    t, h, d = x.shape
    out = x.clone()
    for i in range(d // 2):
        theta = pos.double() * base ** (-2 * i / d)
        c, s = theta.cos().float()[:, None], theta.sin().float()[:, None]
        a, b = (i, i + d // 2) if neox else (2 * i, 2 * i + 1)
        out[:, :, a] = x[:, :, a] * c - x[:, :, b] * s
        out[:, :, b] = x[:, :, a] * s + x[:, :, b] * c
    return out


@pytest.mark.parametrize("neox", [False, True])
def test_rope_matches_pairwise_rotation(neox):
    x, pos = torch.randn(5, 3, 16), torch.tensor([0, 1, 7, 100, 4095])
    rope = Rope(16, 10000.0, neox)
    got = rope.apply(x, *rope.tables(pos))
    torch.testing.assert_close(got, naive_rope(x, pos, 10000.0, neox), rtol=1e-5, atol=1e-5)


def test_causal_mask_with_window():
    mask = causal_mask(start=3, n_query=2, n_key=5, window=2)
    # query positions 3 and 4; keys allowed: 2..3 and 3..4
    assert mask.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
    assert causal_mask(start=9, n_query=1, n_key=10, window=0) is None


def test_attention_matches_naive_gqa():
    q, k, v = torch.randn(3, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    got = attention(q, k, v, start=3, window=0, scale=0.3)
    ref = torch.empty(3, 4, 8)
    for t in range(3):
        for h in range(4):
            kh, vh = k[: 3 + t + 1, h // 2], v[: 3 + t + 1, h // 2]
            w = torch.softmax(kh @ q[t, h] * 0.3, 0)
            ref[t, h] = w @ vh
    torch.testing.assert_close(got, ref.reshape(3, 32), rtol=1e-5, atol=1e-5)


def test_rms_norm():
    x, w = torch.randn(4, 32), torch.randn(32)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_packed_linear_equals_dequantized_matmul(qtype, monkeypatch):
    w = quantize(torch.randn(40, 64), qtype)  # (40, row_bytes)
    lin = PackedLinear(w, qtype, 64, bias=torch.randn(40), native=False)
    lin.rows_per_chunk = 7  # several chunks, the last one short
    x = torch.randn(3, 64)
    ref = x @ dequantize(w, qtype).T + lin.bias
    # float32 sums over 64 products in a different blocking: a few ulps of the result
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.rows(torch.tensor([0, 39])), dequantize(w, qtype)[[0, 39]])


def test_packed_linear_rejects_wrong_row_size():
    with pytest.raises(ValueError, match="does not hold rows"):
        PackedLinear(torch.zeros(4, 10, dtype=torch.uint8), T.Q8_0, 64)
