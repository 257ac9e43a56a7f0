"""PackedLinear: y = x · Wᵀ (+ b) with W kept in its GGML block format.

Where the native kernel (kernels/native_loader.py) is built and handles the type, it does the
product with llama.cpp's CPU numerics (activations quantized per block to int8, integer block
dot products). Two layouts: the GGML rows themselves, read in place from the mapped file; or,
where the build has panel kernels for the type (AVX-512 or AVX2; kernels/native/interleaved.cpp),
the same blocks re-laid out once in 16-row panels (`interleave`), the same bytes per row and
faster for decode and prefill (measured speed-ups: docs/kernels.md).

Otherwise the torch reference path: W stays packed (uint8 rows of GGML blocks, a zero-copy
view of the mmapped GGUF); each call dequantizes row chunks of W to float32 (quant.dequant,
which implements ggml's block layouts, ggml-common.h) into a reused per-thread scratch buffer
and multiplies them, so at most CHUNK_BYTES of float32 weights exist at once.
"""

from __future__ import annotations

import threading

import torch

from kernels import native_loader
from kernels.crossing import cross
from kernels.triton_linear import run_stacked
from quant.dequant import dequantize
from quant.formats import block_format

CHUNK_BYTES = 16 << 20  # float32 bytes of dequantized weight alive at once


class _Scratch(threading.local):
    """A float32 buffer reused by every PackedLinear call of one thread (a fresh large
    allocation per call costs more in page faults than the dequantization itself). One per
    thread, not per process: the server runs one engine thread per model, and two models'
    forwards at once must not dequantize into the same buffer. A thread's buffer goes with it."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.float32)

    def take(self, rows: int, cols: int) -> torch.Tensor:
        if self.buf.numel() < rows * cols:
            with torch.inference_mode(False):  # a normal tensor, writable in and out of it
                self.buf = torch.empty(rows * cols, dtype=torch.float32)
        return self.buf[: rows * cols].view(rows, cols)


_scratch = _Scratch()


class PackedLinear:
    """A linear layer over packed GGML rows: weight (N, row_bytes) uint8 → out_features N."""

    def __init__(
        self,
        weight: torch.Tensor,
        ggml_type: int,
        in_features: int,
        bias: torch.Tensor | None = None,
        native: bool = True,
        panels: torch.Tensor | None = None,
    ) -> None:
        """`panels`: `interleave(weight, ggml_type)`, when the caller made (or shares) them;
        products and row lookups then read those and never touch `weight` again."""
        fmt = block_format(ggml_type)
        if weight.dtype != torch.uint8 or weight.shape[1] != fmt.row_bytes(in_features):
            raise ValueError(
                f"packed weight {tuple(weight.shape)} does not hold rows of "
                f"{in_features} {fmt.name} elements"
            )
        self.weight = weight  # (N, row_bytes) uint8, packed
        self.ggml_type = ggml_type
        self.in_features = in_features
        self.out_features = weight.shape[0]
        self.bias = bias  # (N,) float32 or None
        self.rows_per_chunk = max(1, CHUNK_BYTES // (4 * in_features))
        module = native_loader.load() if native and native_loader.enabled() else None
        self._native = module.qmatmul if module and module.supports(int(ggml_type)) else None
        self.panels = panels if module is not None else None  # (ceil(N/16), panel_bytes) uint8
        self._module = module
        # F32 weights (MoE routers) need no unpacking: a float32 view (N, K) of the rows,
        # multiplied in place (no per-call copy into the scratch buffer)
        self.float_weight: torch.Tensor | None = (
            dequantize(weight, ggml_type) if fmt.name == "F32" else None
        )

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` (an embedding lookup): (T,) → (T, in_features)."""
        if self.panels is not None:
            assert self._module is not None  # panels are kept only with the native module
            packed = self._module.deinterleave(
                self.panels,
                ids.reshape(-1).to(torch.int64),
                int(self.ggml_type),
                self.in_features,
                self.out_features,
            )
            return dequantize(packed, self.ggml_type).reshape(*ids.shape, self.in_features)
        if self.float_weight is not None:
            return self.float_weight[ids]
        return dequantize(self.weight[ids], self.ggml_type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: (M, K) float32 → (M, N) float32
        if x.device.type != "cpu":  # a CPU-pinned weight inside a GPU layer
            return cross(self(cross(x, torch.device("cpu"))), x.device)
        if self.panels is not None:
            assert self._module is not None  # panels are kept only with the native module
            y = self._module.imatmul_many(
                x.contiguous(), [self.panels], [self.out_features], int(self.ggml_type)
            )[0]
            return y + self.bias if self.bias is not None else y
        if self._native is not None:
            y = self._native(x.contiguous(), self.weight, self.ggml_type)
            return y + self.bias if self.bias is not None else y
        if self.float_weight is not None:  # (M, K) · (K, N)
            y = x @ self.float_weight.T
            return y + self.bias if self.bias is not None else y
        n, step = self.out_features, self.rows_per_chunk
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        for start in range(0, n, step):
            rows = self.weight[start : start + step]
            w = dequantize(rows, self.ggml_type, out=_scratch.take(rows.shape[0], self.in_features))
            y[:, start : start + rows.shape[0]] = x @ w.T  # (M, n_chunk)
        if self.bias is not None:
            y += self.bias
        return y


def interleave(weight: torch.Tensor, ggml_type: int) -> torch.Tensor | None:
    """`weight`'s rows in 16-row panels for the panel kernels, or None where this build has
    no panel kernel for the type (then PackedLinear reads the GGML rows)."""
    module = native_loader.load() if native_loader.enabled() else None
    if module is None or not module.interleaved_supports(int(ggml_type)):
        return None
    return module.interleave(weight, int(ggml_type))


def matmuls(linears: list, x: torch.Tensor) -> list[torch.Tensor]:
    """[linear(x) for linear in linears], in one native call when they are all native
    PackedLinears of one type and layout on the same input width (q/k/v, gate/up): the
    activations are quantized once and one parallel job covers every weight's rows. Results
    equal the separate calls bit for bit. GPU linears stacked together (TritonLinear.stacked)
    run as one launch over the stack."""
    stacked = run_stacked(linears, x)
    if stacked is not None:  # GPU linears sharing one stacked weight: one launch
        return stacked
    first = linears[0]
    panels = first.panels is not None if type(first) is PackedLinear else False
    fusable = x.device.type == "cpu" and all(
        type(lin) is PackedLinear
        and (lin._native is not None or lin.panels is not None)  # MXFP4: panels only
        and (lin.panels is not None) == panels
        and lin.ggml_type == first.ggml_type
        and lin.in_features == first.in_features
        for lin in linears
    )
    if not fusable or len(linears) == 1:
        return [lin(x) for lin in linears]
    module = native_loader.load()
    assert module is not None  # fusable: each linear has a native kernel, so the module loaded
    if panels:
        ys = module.imatmul_many(
            x.contiguous(),
            [lin.panels for lin in linears],
            [lin.out_features for lin in linears],
            int(first.ggml_type),
        )
    else:
        ys = module.qmatmul_many(
            x.contiguous(), [lin.weight for lin in linears], int(first.ggml_type)
        )
    return [y + lin.bias if lin.bias is not None else y for y, lin in zip(ys, linears, strict=True)]
