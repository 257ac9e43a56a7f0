"""The native paged decode attention (kernels/native/paged_attention.cpp) against SDPA over
the gathered keys, with GQA, scattered pages, sliding windows and q8-free f16 slabs; and its
batch invariance (a sequence's output alone equals its output in any batch); and the native
write of new keys and values into the f16 slabs, bit for bit torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import kv_write_f16, paged_decode_attention

PAGE = 16


def setup(lengths, h=6, hkv=2, d=64, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-n // PAGE) for n in lengths) + 8
    k = (torch.randn(n_blocks * PAGE, hkv, d, generator=g)).half()
    v = (torch.randn(n_blocks * PAGE, hkv, dv or d, generator=g)).half()
    q = torch.randn(len(lengths), h, d, generator=g)
    perm = torch.randperm(n_blocks, generator=g).tolist()  # scattered pages
    width = max(-(-n // PAGE) for n in lengths)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    for b, n in enumerate(lengths):
        for j in range(-(-n // PAGE)):
            tables[b, j] = perm.pop()
    return q, k, v, tables, torch.tensor(lengths)


def reference(q, k, v, tables, lengths, scale, window):
    outs = []
    for b, n in enumerate(lengths.tolist()):
        pos = torch.arange(n)
        slots = tables[b].long()[pos // PAGE] * PAGE + pos % PAGE
        keep = pos >= n - window if window else torch.ones(n, dtype=torch.bool)
        keys, values = k[slots][keep].float(), v[slots][keep].float()  # (L, Hkv, D)
        o = F.scaled_dot_product_attention(
            q[b][:, None, :],
            keys.transpose(0, 1),
            values.transpose(0, 1),
            scale=scale,
            enable_gqa=True,
        )
        outs.append(o.reshape(-1))
    return torch.stack(outs)


@pytest.fixture(scope="module", autouse=True)
def native():
    if paged_decode_attention(*setup([3])[:5], 0.125, 0) is None:
        pytest.skip("no native build here")


@pytest.mark.parametrize("window", [0, 7, 40])
def test_matches_sdpa_over_gathered_keys(window):
    q, k, v, tables, lengths = setup([1, 17, 70, 33, 160])
    got = paged_decode_attention(q, k, v, tables, lengths, 0.125, window)
    # float32 softmax and sums in another order than SDPA's
    torch.testing.assert_close(
        got, reference(q, k, v, tables, lengths, 0.125, window), rtol=1e-5, atol=2e-6
    )


# (query heads, KV heads, head size, value size): Qwen3.5's 16/4 × 256, gpt-oss's 64/8 × 64, a
# group of 3 (a partial head tile), a size that fills no whole vector (the portable form), values
# longer and shorter than keys; lengths past one task of 256 positions, and a key count that
# leaves a partial tile of keys; with and without a window, and with gpt-oss's sinks; in each
# build (conftest's isa_build: AVX-512 16-lane tiles, AVX2 8-lane ones, the portable form).
@pytest.mark.parametrize(
    "h,hkv,d,dv",
    [
        (16, 4, 256, None),
        (64, 8, 64, None),
        (9, 3, 128, None),
        (4, 2, 72, None),
        (4, 1, 32, 64),
        (8, 2, 128, 64),
    ],
)
def test_head_shapes_and_long_contexts(isa_build, h, hkv, d, dv):
    q, k, v, tables, lengths = setup([1, 258, 700, 91], h=h, hkv=hkv, d=d, dv=dv, seed=1)
    scale = d**-0.5
    for window in (0, 300):
        got = isa_build.paged_decode_attention(q, k, v, tables, lengths, scale, window)
        torch.testing.assert_close(
            got, reference(q, k, v, tables, lengths, scale, window), rtol=1e-5, atol=2e-6
        )
    # a sink logit per head joins the softmax's denominator only
    sinks = torch.randn(h, generator=torch.Generator().manual_seed(2))
    got = isa_build.paged_decode_attention(q, k, v, tables, lengths, scale, 0, sinks)
    plain = isa_build.paged_decode_attention(q, k, v, tables, lengths, scale, 0)
    dv = dv or d
    for b, n in enumerate(lengths.tolist()):
        pos = torch.arange(n)
        slots = tables[b].long()[pos // PAGE] * PAGE + pos % PAGE
        keys = k[slots].float().repeat_interleave(h // hkv, dim=1)  # (n, H, D)
        scores = torch.einsum("hd,nhd->hn", q[b], keys) * scale
        top = scores.max(dim=1).values
        kept = (scores - top[:, None]).exp().sum(1) / (
            (scores - top[:, None]).exp().sum(1) + (sinks - top).exp()
        )
        torch.testing.assert_close(
            got[b].view(h, dv), plain[b].view(h, dv) * kept[:, None], rtol=1e-5, atol=2e-6
        )


def test_each_sequence_alone_equals_the_batch_bit_for_bit():
    q, k, v, tables, lengths = setup([5, 130, 64, 16], h=9, hkv=3)
    batch = paged_decode_attention(q, k, v, tables, lengths, 0.1, 0)
    for b in range(4):
        alone = paged_decode_attention(
            q[b : b + 1], k, v, tables[b : b + 1], lengths[b : b + 1], 0.1, 0
        )
        assert torch.equal(alone[0], batch[b])


def test_bad_tables_and_lengths_are_refused():
    q, k, v, tables, lengths = setup([20])
    with pytest.raises(RuntimeError, match="outside"):
        paged_decode_attention(q, k, v, tables, torch.tensor([999]), 0.1, 0)
    with pytest.raises(RuntimeError, match="outside the slab"):
        paged_decode_attention(q, k, v, torch.full_like(tables, 10_000), lengths, 0.1, 0)


def test_kv_write_rounds_as_torch_and_skips_negative_slots():
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(4, 2, 64, generator=g) * 300, torch.randn(4, 2, 32, generator=g)
    k[0, 0, :3] = torch.tensor([70000.0, 1e-6, -2.5e-8])  # overflow and subnormals round too
    slots = torch.tensor([17, -1, 0, 63])
    k_slab, v_slab = torch.zeros(64, 2, 64).half(), torch.zeros(64, 2, 32).half()
    want_k, want_v = k_slab.clone(), v_slab.clone()
    keep = slots >= 0
    want_k[slots[keep]], want_v[slots[keep]] = k[keep].half(), v[keep].half()
    assert kv_write_f16(k, v, k_slab, v_slab, slots)
    assert torch.equal(k_slab.view(torch.int16), want_k.view(torch.int16))
    assert torch.equal(v_slab.view(torch.int16), want_v.view(torch.int16))


def test_kv_write_refuses_a_slot_outside_the_slab():
    k_slab, v_slab = torch.zeros(16, 1, 8).half(), torch.zeros(16, 1, 8).half()
    with pytest.raises(RuntimeError, match="outside the slab"):
        kv_write_f16(torch.ones(1, 1, 8), torch.ones(1, 1, 8), k_slab, v_slab, torch.tensor([16]))
    assert not bool(k_slab.float().abs().sum())
