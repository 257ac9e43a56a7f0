"""llama-perplexity's KL-divergence base file (`--kl-divergence-base FILE`): the evaluated
tokens and, for every scored position, the base model's log-probabilities packed in 16 bits.

    base = KLBase.read(path)          # or KLBase.from_logits(...) then base.write(path)
    base.log_probs(chunk)             # (R, V) float32: log p of every token, R = n_ctx-1-n_ctx//2

Layout (little-endian, as tools/perplexity/perplexity.cpp writes it):

    "_logits_"                          8 bytes
    n_ctx, n_vocab, n_chunk             int32 each (n_ctx unsigned when read back)
    tokens                              int32 × n_chunk·n_ctx (the text's, BOS not substituted)
    per chunk, per scored position      uint16 × nv, nv = 2·⌈n_vocab/2⌉ + 4:
        [0:4]  two float32: scale, min_log_prob
        [4:4+n_vocab]  q_i: log p_i ≈ scale·q_i + min_log_prob

A chunk scores positions n_ctx//2 … n_ctx-2 (the prediction of tokens n_ctx//2+1 … n_ctx-1):
R = n_ctx - 1 - n_ctx//2 rows. The packing clips logits to [max-16, max]: min_logit =
max(min, max-16), scale = (max - min_logit)/65535, q = round((logit - min_logit)/scale)
(0 for logits at or below min_logit), min_log_prob = min_logit - max - log Σ exp(logit - max).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quant.errors import GGUFError

MAGIC = b"_logits_"
CLIP = 16.0  # nats below the top logit that the 16-bit packing keeps


def row_width(n_vocab: int) -> int:
    """uint16 words per scored position: two float32 then the padded vocabulary."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_rows(n_ctx: int) -> int:
    """Positions a chunk scores (llama-perplexity: the second half, less the last)."""
    return n_ctx - 1 - n_ctx // 2


@dataclass
class KLBase:
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # (n_chunk * n_ctx,) int32
    packed: np.ndarray  # (n_chunk, R, nv) uint16

    @property
    def n_chunk(self) -> int:
        return self.packed.shape[0]

    @classmethod
    def read(cls, path: str | Path) -> KLBase:
        """The file as llama-perplexity wrote it; GGUFError naming what is wrong."""
        data = Path(path).read_bytes()
        if data[:8] != MAGIC:
            raise GGUFError(
                f"{path} is not a llama-perplexity KL-divergence base file (no '_logits_' "
                "header); write one with --kl-divergence-base FILE (without --kl-divergence)"
            )
        n_ctx, n_vocab, n_chunk = np.frombuffer(data, np.int32, 3, 8).tolist()
        if n_ctx < 2 or n_vocab < 1 or n_chunk < 1:
            raise GGUFError(f"{path}: bad header n_ctx={n_ctx} n_vocab={n_vocab} n_chunk={n_chunk}")
        nv, rows = row_width(n_vocab), scored_rows(n_ctx)
        offset = 20 + 4 * n_ctx * n_chunk
        need = offset + 2 * nv * rows * n_chunk
        if len(data) < need:
            raise GGUFError(f"{path} is truncated: {len(data)} bytes, its header needs {need}")
        tokens = np.frombuffer(data, np.int32, n_ctx * n_chunk, 20).copy()
        packed = np.frombuffer(data, np.uint16, nv * rows * n_chunk, offset)
        return cls(n_ctx, n_vocab, tokens, packed.reshape(n_chunk, rows, nv).copy())

    def write(self, path: str | Path) -> None:
        header = np.array([self.n_ctx, self.n_vocab, self.n_chunk], dtype=np.int32)
        with open(path, "wb") as f:
            f.write(MAGIC)
            f.write(header.tobytes())
            f.write(self.tokens.astype(np.int32).tobytes())
            f.write(np.ascontiguousarray(self.packed, dtype=np.uint16).tobytes())

    def chunk_tokens(self, chunk: int) -> np.ndarray:
        """(n_ctx,) int32: chunk `chunk`'s tokens."""
        return self.tokens[chunk * self.n_ctx : (chunk + 1) * self.n_ctx]

    def scales(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(R,) float32 scale and (R,) float32 min_log_prob of chunk `chunk`'s rows."""
        pair = self.packed[chunk, :, :4].copy().view(np.float32)  # (R, 2)
        return pair[:, 0], pair[:, 1]

    def log_probs(self, chunk: int) -> np.ndarray:
        """(R, V) float32: the base's log p of every token at each scored position."""
        scale, low = self.scales(chunk)
        q = self.packed[chunk, :, 4 : 4 + self.n_vocab].astype(np.float32)
        return scale[:, None] * q + low[:, None]


def pack_rows(logits: np.ndarray) -> np.ndarray:
    """(R, V) float32 logits → (R, nv) uint16 rows as llama-perplexity packs them."""
    logits = logits.astype(np.float32)
    rows, n_vocab = logits.shape
    top = logits.max(-1)
    low = np.maximum(logits.min(-1), top - np.float32(CLIP))
    log_sum = np.log(np.exp((logits - top[:, None]).astype(np.float64)).sum(-1)).astype(np.float32)
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    out = np.zeros((rows, row_width(n_vocab)), dtype=np.uint16)
    head = np.stack([scale, (low - top - log_sum).astype(np.float32)], -1)  # (R, 2)
    out[:, :4] = head.astype(np.float32).view(np.uint16)
    safe = np.where(scale > 0, scale, np.float32(1))
    inv = (np.float32(1) / safe).astype(np.float32)
    q = np.rint(inv[:, None] * (logits - low[:, None]))  # round half to even, like nearest_int
    q = np.where((logits > low[:, None]) & (scale[:, None] > 0), q, 0)
    out[:, 4 : 4 + n_vocab] = np.clip(q, 0, 65535).astype(np.uint16)
    return out
