"""The paged batched forward (ModelRunner: KVPool + ForwardBatch) on a tiny synthetic llama: sequences of
different lengths — prefill chunks and decodes mixed in one step, pages scattered over the
pool — give the logits each sequence gets alone over a contiguous cache. Plus the KV pool's
storage types and page copies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference_model import KVCache, forward
from test_model_synthetic import make_weights, write_gguf

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.kv.kv_pool import BLOCK_SIZE, KVPool, kv_bytes_per_token, slots_for
from runtime.models import Model, build_model


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("paged") / "llama.gguf"
    write_gguf(path, "llama", make_weights("llama", seed=3))
    return GGUFFile(path)


@pytest.fixture(scope="module")
def model(gguf_file):
    return build_model(
        gguf_file, ModelConfig.from_metadata(gguf_file.metadata, gguf_file.tensors.keys())
    )


def alone(model: Model, tokens: list[int]) -> torch.Tensor:
    """Logits (T, V) of every position of one sequence over a contiguous f16 cache."""
    with torch.inference_mode():
        return forward(model, torch.tensor(tokens), 0, KVCache(model.config, 64), all_logits=True)


def test_mixed_batch_equals_each_sequence_alone(model):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (40, 7, 23)]
    # scattered, interleaved pages: seq 0 takes blocks 5, 0, 7; seq 1 block 3; seq 2 blocks 6, 1
    tables = [[5, 0, 7], [3], [6, 1]]
    runner = ModelRunner(model, 8)
    done = [0, 0, 0]
    got: list[list[torch.Tensor]] = [[], [], []]
    # step 1: prefill chunks of 20, 6 and 23 tokens; steps 2…: 20 more for seq 0, then decodes
    plan = [[20, 6, 23], [20, 1, 0]] + [[0, 0, 0]] * 7
    with torch.inference_mode():
        for chunk in plan:
            items, owners = [], []
            for s, n in enumerate(chunk):
                n = n or (1 if done[s] < len(seqs[s]) else 0)
                if n == 0:
                    continue
                ids = seqs[s][done[s] : done[s] + n]
                items.append((ids, done[s], tables[s], True))
                owners.append(s)
                done[s] += n
            if not items:
                break
            batch = ForwardBatch.build(items)
            logits = runner.run(batch)
            for s, row in zip(owners, logits, strict=True):
                got[s].append((done[s] - 1, row))
    for s, tokens in enumerate(seqs):
        ref = alone(model, tokens)
        for pos, row in got[s]:
            # same f16 cache contents; attention over the same keys in another call shape
            torch.testing.assert_close(row, ref[pos], rtol=1e-4, atol=1e-4)
    assert done == [40, 7, 23]


def test_decode_group_masks_padding_and_window():
    batch = ForwardBatch.build(
        [([1], 4, [2], True), ([2], 19, [0, 1], True), ([3, 4], 0, [3], True)]
    )
    d = batch.decode
    assert d.rows.tolist() == [0, 1] and d.width == 20 and d.lengths.tolist() == [5, 20]
    assert [s.n for s in batch.seqs] == [2]  # the 2-token sequence is attended on its own
    mask = d.mask(0)[:, 0, 0]
    assert mask[0].tolist() == [True] * 5 + [False] * 15
    assert mask[1].all()
    windowed = d.mask(4)[:, 0, 0]
    assert windowed[1].nonzero().flatten().tolist() == [16, 17, 18, 19]
    # sequence 0's padding repeats its last position: never a slot it has not written
    assert d.slots.view(2, 20)[0].tolist() == [2 * BLOCK_SIZE + min(i, 4) for i in range(20)]
    assert batch.slots.tolist() == [2 * BLOCK_SIZE + 4, 1 * BLOCK_SIZE + 3, 48, 49]
    assert batch.logit_rows.tolist() == [0, 1, 3]


def test_sliding_window_chunks_equal_the_whole_context(model, gguf_file):
    """A sliding-window layer's prefill chunk reads only the last `window` positions before
    it (the rest are masked anyway): chunks at depth give the logits of a single pass over
    a contiguous cache, which attends over every key with the mask."""
    c = dataclasses.replace(model.config, sliding_window=8, swa_layers=(True, False))
    windowed = build_model(gguf_file, c)
    tokens = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    runner = ModelRunner(windowed, 3)
    with torch.inference_mode():
        got = [
            runner.run(ForwardBatch.build([(tokens[a:b], a, [2, 0, 1], True)]))[0]
            for a, b in ((0, 13), (13, 30), (30, 40))
        ]
        whole = forward(windowed, torch.tensor(tokens), 0, KVCache(c, 64), all_logits=True)
    for row, end in zip(got, (13, 30, 40), strict=True):
        torch.testing.assert_close(row, whole[end - 1], rtol=1e-4, atol=1e-4)


def test_unwritten_pool_memory_never_reaches_the_logits(model, monkeypatch):
    """The pool is torch.empty memory: slots not yet written may hold inf or NaN. Decodes of
    sequences of different lengths in one step through the gathered path (a q8_0 pool's, or
    any without the native kernel; forced here) give the same logits over a NaN-filled pool
    as over a zeroed one. Before the fix, q8_0 decoding changed from run to run."""
    import runtime.kv.attention_backends as backends

    monkeypatch.setattr(backends, "paged_decode_attention", lambda *a, **k: None)
    seqs, tables = [[1, 2, 3, 4, 5, 6, 7], [8, 9]], [[0], [1]]

    def decode_logits(fill: float) -> torch.Tensor:
        runner = ModelRunner(model, 2)
        for slab in (*runner.pool.k, *runner.pool.v):
            slab.data.fill_(fill)
        with torch.inference_mode():
            runner.run(
                ForwardBatch.build(
                    [(s[:-1], 0, t, False) for s, t in zip(seqs, tables, strict=True)]
                )
            )
            return runner.run(
                ForwardBatch.build(
                    [([s[-1]], len(s) - 1, t, True) for s, t in zip(seqs, tables, strict=True)]
                )
            )

    clean, dirty = decode_logits(0.0), decode_logits(float("nan"))
    assert torch.isfinite(dirty).all() and torch.equal(clean, dirty)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_pool_round_trip_and_page_copy(model, kind):
    c = dataclasses.replace(model.config, head_dim=64, head_dim_v=64)  # Q8_0 needs 32 | D
    pool = KVPool(c, 4, kind)
    assert pool.nbytes == 4 * BLOCK_SIZE * kv_bytes_per_token(c, kind)
    g = torch.Generator().manual_seed(5)
    k = torch.randn(BLOCK_SIZE, c.n_head_kv, c.head_dim, generator=g)
    v = torch.randn(BLOCK_SIZE, c.n_head_kv, c.head_dim_v, generator=g)
    slots = slots_for([2], 0, BLOCK_SIZE)
    pool.write(1, slots, k, v)
    rk, rv = pool.read(1, slots)
    # f16 rounds to 11 significant bits; Q8_0 to amax/254 per 32 values
    tol = max(k.abs().max().item(), v.abs().max().item()) * (2**-11 if kind == "f16" else 1 / 250)
    assert (rk - k).abs().max() <= tol and (rv - v).abs().max() <= tol
    pool.copy_blocks([(2, 0)])
    ck, cv = pool.read(1, slots_for([0], 0, BLOCK_SIZE))
    assert torch.equal(ck, rk) and torch.equal(cv, rv)
