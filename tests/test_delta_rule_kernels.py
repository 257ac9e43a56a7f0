"""The gated delta rule's kernels — native CPU (kernels/native/delta_rule.cpp: its row form,
its chunked form, and the two mixed by position as a layer calls it), Triton (in its CPU
interpreter here) and the torch fallback — against the plain per-token recurrence
(kernels/delta_rule.delta_rule) in float64: outputs and final states, over sequences, heads
(q/k heads shared by several v heads), head sizes (one not a multiple of 8: the scalar
rows), token counts (one, several, not a multiple of the chunk), sequences starting mid-chunk,
a non-zero initial state, and decays near 0 (long memory) and strongly negative (e^g
underflows to 0). A prefill cut into calls at multiples of the chunk gives the one-call
result bit for bit.

Tolerance: float32 against float64, |got − want| ≤ TOL · max(1, max |want|) elementwise,
TOL = 1e-5. Measured worst over these cases, relative to max(1, max |want|): the row form
1.6e-7 on o and 4.4e-7 on S, the chunked form 2.2e-7 and 6.5e-7 (and, earlier, the rows
2.5e-6 absolute on S after 512 tokens of near-zero decay, |S| ≤ 3.4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import delta_rule as dr
from kernels import native_loader

TOL = 1e-5
# (B, n, Hk, Hv, D)
SHAPES = [
    (1, 1, 2, 4, 128),  # a decode step at qwen35's head size
    (3, 1, 4, 4, 64),  # a batched decode
    (2, 150, 2, 4, 32),  # a prefill over 5 chunks, the last one ragged
    (1, 70, 1, 3, 12),  # 12: no 8-lane rows
    (2, 100, 2, 2, 128),  # whole chunks and ragged ends at qwen35's head size
]
STARTS = {"at 0": 0, "mid-chunk": 13}  # sequence b's first position: this + 40·b
DECAYS = {"mixed": (-2.0, 0.0), "near_zero": (-1e-3, 0.0), "strong": (-60.0, -5.0)}


def inputs(shape: tuple[int, ...], decay: str, seed: int = 0):
    """q, k unit per head (as the layer hands them over), v, g in `decay`'s range, β in
    (0, 1), a non-zero state (B, Hv, D, D); float64."""
    b, n, hk, hv, d = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    lo, hi = DECAYS[decay]
    q, k = F.normalize(rand(b, n, hk, d), dim=-1), F.normalize(rand(b, n, hk, d), dim=-1)
    v = rand(b, n, hv, d)
    g = lo + (hi - lo) * torch.rand(b, n, hv, generator=gen, dtype=torch.float64)
    beta = torch.rand(b, n, hv, generator=gen, dtype=torch.float64)
    return q, k, v, g, beta, 0.3 * rand(b, hv, d, d)


def reference(q, k, v, g, beta, state):
    hv = v.shape[2]
    return dr.delta_rule(dr.tile_heads(q, hv), dr.tile_heads(k, hv), v, g, beta, state)


def assert_near(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got.double() - want).abs().max().item()
    bound = TOL * max(1.0, want.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def check(rule, shape, decay):
    """rule(q, k, v, g, beta, states) on float32 copies → its o and states against the
    float64 reference."""
    q, k, v, g, beta, state = inputs(shape, decay)
    want_o, want_s = reference(q, k, v, g, beta, state)
    states = [s.float().clone() for s in state]
    o = rule(*(x.float() for x in (q, k, v, g, beta)), states)
    assert o.shape == want_o.shape
    assert_near(o, want_o, "o")
    assert_near(torch.stack(states), want_s, "state")


@pytest.mark.skipif(not native_loader.available(), reason="the native CPU kernel is not built")
@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("form", [-1, 0, 1], ids=["as-layers-call", "rows", "chunked"])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("shape", SHAPES)
def test_native_is_the_recurrence(shape, decay, form, start):
    module = dr._native(torch.zeros(1))
    assert module is not None  # the native kernel, not the fallback
    starts = [STARTS[start] + 40 * b for b in range(shape[0])]  # b > 0: another place

    def rule(q, k, v, g, beta, states):
        return module.delta_rule(q, k, v, g, beta, states, form=form, starts=starts)

    check(rule, shape, decay)


@pytest.mark.parametrize("form", [-1, 1], ids=["as-layers-call", "chunked"])
def test_every_build_is_the_recurrence(isa_build, form):
    """The chunked form's tiles in each build (AVX-512: 16 lanes, AVX2: 8, scalar: 1), with
    a lead, whole chunks and a tail, and the rows around them."""
    shape = (2, 100, 2, 4, 64)

    def rule(q, k, v, g, beta, states):
        return isa_build.delta_rule(q, k, v, g, beta, states, form=form, starts=[5, 64])

    for decay in DECAYS:
        check(rule, shape, decay)


@pytest.mark.skipif(not native_loader.available(), reason="the native CPU kernel is not built")
def test_native_chunk_is_the_one_the_scheduler_aligns_to():
    assert dr._module().DELTA_RULE_CHUNK == dr.CHUNK_ALIGN


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("shape", SHAPES[::2])
def test_torch_fallback_is_the_recurrence(shape, decay, monkeypatch):
    monkeypatch.setattr(dr, "_native", lambda *tensors: None)
    check(dr.delta_rule_states, shape, decay)


TRITON_CASES = [  # (shape, starts): None, or ones that give whole chunks (the chunked kernel)
    ((1, 1, 2, 4, 128), None),
    ((2, 20, 2, 4, 32), None),
    ((1, 9, 1, 3, 12), None),
    ((2, 70, 2, 4, 32), [0, 13]),  # a lead, whole chunks and a tail; 13: one whole chunk
    ((1, 40, 1, 2, 128), [32]),  # one whole chunk at qwen35's head size, then a tail
]


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("shape,starts", TRITON_CASES)
def test_triton_is_the_recurrence(shape, starts, decay):
    tk = pytest.importorskip("kernels.triton")  # sets TRITON_INTERPRET before triton loads
    from kernels.triton import delta_rule as tdr

    chunked = tdr._spans(starts, shape[0], shape[1]) is not None
    assert chunked == (starts is not None)  # the cases with starts do run the chunked kernel
    check(lambda *x: tk.delta_rule_states(*x, starts), shape, decay)


def test_triton_in_calls_at_chunk_multiples_is_one_call():
    """As for the native kernel: cut at multiples of the chunk, bit for bit."""
    tk = pytest.importorskip("kernels.triton")
    q, k, v, g, beta, state = (x.float() for x in inputs((1, 70, 1, 2, 32), "mixed"))
    whole = [s.clone() for s in state]
    want = tk.delta_rule_states(q, k, v, g, beta, whole, [0])
    split = [s.clone() for s in state]
    parts = []
    for a, b in ((0, 32), (32, 70)):
        at = slice(a, b)
        parts.append(
            tk.delta_rule_states(q[:, at], k[:, at], v[:, at], g[:, at], beta[:, at], split, [a])
        )
    assert torch.equal(torch.cat(parts, 1), want)
    assert torch.equal(torch.stack(split), torch.stack(whole))


@pytest.mark.skipif(not native_loader.available(), reason="the native CPU kernel is not built")
@pytest.mark.parametrize(
    "cuts",
    [(0, 64, 100), (0, 32, 96, 100, 101), (7, 32, 64, 90)],
    ids=["at-64", "at-chunks-then-decode", "from-7-at-chunks"],
)
def test_native_in_calls_at_chunk_multiples_is_one_call(cuts):
    """A prefill cut into calls at multiples of the chunk (the state carried in place; then
    decode steps) gives the one-call result bit for bit: each whole chunk takes the chunked
    form and each ragged end the rows, wherever the call begins. Positions are cuts[0] on."""
    n = cuts[-1] - cuts[0]
    q, k, v, g, beta, state = (x.float() for x in inputs((2, n, 2, 4, 64), "mixed"))
    whole = [s.clone() for s in state]
    want = dr.delta_rule_states(q, k, v, g, beta, whole, [cuts[0]] * 2)
    split = [s.clone() for s in state]
    parts = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        at = slice(a - cuts[0], b - cuts[0])
        parts.append(
            dr.delta_rule_states(
                q[:, at], k[:, at], v[:, at], g[:, at], beta[:, at], split, [a] * 2
            )
        )
    assert torch.equal(torch.cat(parts, 1), want)
    assert torch.equal(torch.stack(split), torch.stack(whole))


@pytest.mark.skipif(not native_loader.available(), reason="the native CPU kernel is not built")
def test_native_rows_in_any_two_calls_are_one_call():
    """The row form alone is exact under any cut (each state row runs the same float
    operations either way)."""
    module = dr._module()
    q, k, v, g, beta, state = (x.float() for x in inputs((2, 40, 2, 4, 64), "mixed"))
    whole = [s.clone() for s in state]
    want = module.delta_rule(q, k, v, g, beta, whole, form=0)
    split = [s.clone() for s in state]
    parts = []
    for a, b in ((0, 13), (13, 40)):
        cut = (x[:, a:b].contiguous() for x in (q, k, v, g, beta))
        parts.append(module.delta_rule(*cut, split, form=0))
    assert torch.equal(torch.cat(parts, 1), want)
    assert torch.equal(torch.stack(split), torch.stack(whole))


@pytest.mark.skipif(not native_loader.available(), reason="the native CPU kernel is not built")
def test_native_rejects_wrong_shapes():
    q, k, v, g, beta, state = (x.float() for x in inputs((1, 2, 2, 4, 16), "mixed"))
    with pytest.raises(RuntimeError, match="multiple of Hk"):
        dr.delta_rule_states(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3], [state[0][:3]])
    with pytest.raises(RuntimeError, match="2 states for 1 sequences"):
        dr.delta_rule_states(q, k, v, g, beta, [state[0], state[0].clone()])
    with pytest.raises(RuntimeError, match="2 starts for 1 sequences"):
        dr.delta_rule_states(q, k, v, g, beta, [state[0]], [0, 5])
    with pytest.raises(RuntimeError, match="a start is negative"):
        dr.delta_rule_states(q, k, v, g, beta, [state[0]], [-1])
