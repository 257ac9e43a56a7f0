"""The compact form of a llama-perplexity KL-divergence base file kept as a CI fixture
(tests/data/conformance/ARCH.npz), and the settings the fixtures were recorded with.

A raw base file holds n_vocab 16-bit log-probabilities per scored position (SmolLM2's
vocabulary: 98 KB a position). The comparison reads only some of them: KL(base‖Q) sums the
tokens whose base log p > -16 (perplexity.cpp skips the rest), NLL reads the correct token's,
top-1 the largest. The fixture keeps exactly those entries (index and 16-bit value) plus each
row's scale and offset and the tokens; `load` rebuilds a KLBase whose other entries are 0,
i.e. log p = min_log_prob ≤ the dropped value ≤ -16, still skipped. So every figure the
comparison computes from the rebuilt file (KL, top-1, NLL, Δp) equals the raw file's
exactly: the approximation error is 0 (tests/test_conformance.py checks this on a raw file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loaders.kl_base import CLIP, KLBase, row_width

SEED = 0  # make_synthetic_gguf.py --seed of the recorded models
WEIGHT_TYPE = "q8_0"  # their linear weights (llama.cpp and tandem quantize activations alike)
VOCAB = "smollm2"  # their tokenizer (pulled; the tests pull it too)


def kept(base: KLBase, chunk: int) -> np.ndarray:
    """(R, V) bool: the entries the comparison reads."""
    logp = base.log_probs(chunk)
    keep = logp > -CLIP
    first = base.n_ctx // 2
    targets = base.chunk_tokens(chunk)[first + 1 :]
    keep[np.arange(len(targets)), targets] = True
    keep[np.arange(len(targets)), logp.argmax(-1)] = True
    return keep


def save(base: KLBase, path: Path) -> None:
    idx, vals, counts = [], [], []
    for c in range(base.n_chunk):
        keep = kept(base, c)
        q = base.packed[c, :, 4 : 4 + base.n_vocab]
        for r in range(keep.shape[0]):
            where = np.flatnonzero(keep[r])
            idx.append(where.astype(np.uint32))
            vals.append(q[r, where])
            counts.append(len(where))
    np.savez_compressed(
        path,
        header=np.array([base.n_ctx, base.n_vocab], dtype=np.int64),
        tokens=base.tokens.astype(np.int32),
        heads=base.packed[:, :, :4].copy(),
        counts=np.array(counts, dtype=np.int32),
        idx=np.concatenate(idx),
        vals=np.concatenate(vals).astype(np.uint16),
    )


def load(path: Path) -> KLBase:
    with np.load(path) as z:
        n_ctx, n_vocab = (int(v) for v in z["header"])
        heads, counts, idx, vals = z["heads"], z["counts"], z["idx"], z["vals"]
        tokens = z["tokens"]
    n_chunk, rows = heads.shape[:2]
    packed = np.zeros((n_chunk, rows, row_width(n_vocab)), dtype=np.uint16)
    packed[:, :, :4] = heads
    flat = packed.reshape(n_chunk * rows, -1)
    row_of = np.repeat(np.arange(n_chunk * rows), counts)
    flat[row_of, 4 + idx.astype(np.int64)] = vals
    return KLBase(n_ctx, n_vocab, tokens, flat.reshape(n_chunk, rows, -1))
