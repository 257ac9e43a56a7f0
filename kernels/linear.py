"""PackedLinear: y = x · Wᵀ (+ b) with W kept in its GGML block format.

The CPU reference path: W stays packed (uint8 rows of GGML blocks, a zero-copy view of the
mmapped GGUF); each call dequantizes row chunks of W to float32 (quant.dequant) and multiplies
them, so at most CHUNK_BYTES of float32 weights exist at once. Block layouts: see
quant/dequant.py, which implements ggml's formats (ggml-common.h block_q4_0 …).
"""

from __future__ import annotations

import torch

from quant.dequant import dequantize
from quant.formats import block_format

CHUNK_BYTES = 32 << 20  # float32 bytes of dequantized weight alive at once


class PackedLinear:
    """A linear layer over packed GGML rows: weight (N, row_bytes) uint8 → out_features N."""

    def __init__(self, weight: torch.Tensor, ggml_type: int, in_features: int,
                 bias: torch.Tensor | None = None) -> None:
        fmt = block_format(ggml_type)
        assert weight.dtype == torch.uint8 and weight.shape[1] == fmt.row_bytes(in_features)
        self.weight = weight            # (N, row_bytes) uint8, packed
        self.ggml_type = ggml_type
        self.in_features = in_features
        self.out_features = weight.shape[0]
        self.bias = bias                # (N,) float32 or None
        self.rows_per_chunk = max(1, CHUNK_BYTES // (4 * in_features))

    @property
    def nbytes(self) -> int:
        return self.weight.numel()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` (an embedding lookup): (T,) → (T, in_features)."""
        return dequantize(self.weight[ids], self.ggml_type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: (M, K) float32 → (M, N) float32
        n, step = self.out_features, self.rows_per_chunk
        if n <= step:
            y = x @ dequantize(self.weight, self.ggml_type).T
        else:
            y = torch.empty(x.shape[0], n, dtype=torch.float32)
            for start in range(0, n, step):
                w = dequantize(self.weight[start:start + step], self.ggml_type)  # (n_chunk, K)
                y[:, start:start + w.shape[0]] = x @ w.T
        if self.bias is not None:
            y += self.bias
        return y
