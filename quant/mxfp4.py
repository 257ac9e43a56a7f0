"""MXFP4 blocks (OCP microscaling FP4, gpt-oss's expert weights): dequantization to float32,
bit-exact with gguf-py's `gguf.quants.MXFP4`.

A block is 32 elements in 17 bytes: `e` (one E8M0 byte, a power-of-two scale) then qs[16],
whose low nibbles are elements 0..15 and high nibbles elements 16..31. Each nibble indexes
the E2M1 values, doubled so they are integers (KVALUES); the scale is halved to match:

    x[j] = e8m0_half(e) · KVALUES[nib(j)],   e8m0_half(e) = 2^(e − 128)

(for e < 2 the value is the float32 subnormal 2^(e − 128), as ggml_e8m0_to_fp32_half builds
it). Products of a power of two and a small integer are exact, so the result is exact.
"""

from __future__ import annotations

import torch

BLOCK_SIZE, TYPE_SIZE = 32, 17
# E2M1 values times two: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)

_luts: dict[torch.device, torch.Tensor] = {}


def _lut(device: torch.device) -> torch.Tensor:
    if device not in _luts:
        _luts[device] = torch.tensor(KVALUES, dtype=torch.float32, device=device)
    return _luts[device]


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """E8M0 scale bytes (uint8, any shape) → 2^(e − 128) as float32 (same shape)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.bitwise_left_shift(0x00200000, e), (e - 1) << 23)
    return bits.view(torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """blocks (n, 17) uint8 → out (n, 32) float32 (quant/dequant.py's Dequantizer shape)."""
    qs = blocks[:, 1:]  # (n, 16)
    idx = torch.cat((qs & 0x0F, qs >> 4), 1).long()  # (n, 32): element j's nibble
    torch.index_select(_lut(blocks.device), 0, idx.view(-1), out=out.view(-1))
    out.mul_(e8m0_half(blocks[:, :1]))  # (n, 1) scale per block
