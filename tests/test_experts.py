"""Routed expert matmuls (kernels/experts.py): the experts' panels (kernels/native/
interleaved.cpp), the native grouped row kernel (kernels/native/moe.cpp), the per-expert path of other types and Triton's grouped kernel (interpreted on the
CPU) against a float64 reference built from gguf-py's dequantization; and the stream counter:
each chosen expert's weights are read once per call for all the rows that chose it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from test_quant import random_blocks

from kernels import native_loader
from kernels.experts import PackedExperts, expert_matmuls, expert_stats, interleave_experts

E, N, K = 12, 40, 128  # N not a multiple of the 32-row chunk


def _experts(qtype: T, seed: int = 0, n: int = N, k: int = K) -> tuple[torch.Tensor, np.ndarray]:
    w = np.random.default_rng(seed).standard_normal((E, n, k)).astype(np.float32)
    if qtype in (T.Q4_K, T.Q6_K):  # no K-quant quantizer in gguf-py: random blocks
        packed = random_blocks(qtype.name, (E * n,), k // 256, seed)
    else:
        packed = quants.quantize(w.reshape(E * n, k), qtype)  # (E·N, row_bytes)
    dense = quants.dequantize(packed, qtype).reshape(E, n, k)
    return torch.from_numpy(packed.reshape(E, n, -1).copy()), dense


def _reference(x: np.ndarray, dense: np.ndarray, src, expert, q8: bool) -> np.ndarray:
    """float64 x[src[r]] · W[expert[r]]ᵀ; with q8, x first through Q8_0 as the kernel does."""
    if q8:
        x = quants.dequantize(quants.quantize(x, T.Q8_0), T.Q8_0)
    x = x.astype(np.float64)
    return np.stack([dense[e].astype(np.float64) @ x[s] for s, e in zip(src, expert, strict=True)])


def _routing(tokens: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])  # (T, k)
    src = torch.arange(tokens).repeat_interleave(k)
    return src, chosen.reshape(-1)


needs_native = pytest.mark.skipif(
    not native_loader.available(), reason="the native CPU kernel is not built here"
)


@needs_native
@pytest.mark.parametrize("qtype", [T.MXFP4, T.Q4_0, T.Q8_0])
def test_native_grouped_kernel_matches_reference(qtype):
    packed, dense = _experts(qtype)
    x = np.random.default_rng(2).standard_normal((5, K)).astype(np.float32)
    src, expert = _routing(5, 4)
    lin = PackedExperts(packed, int(qtype), K)
    assert lin._module is not None  # the native grouped kernel, not the fallback
    got = lin(torch.from_numpy(x), src, expert).numpy()
    want = _reference(x, dense, src.tolist(), expert.tolist(), q8=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_native
@pytest.mark.parametrize(
    ("qtype", "k"), [(T.Q4_0, 128), (T.Q8_0, 64), (T.Q4_K, 256), (T.Q6_K, 512)]
)
@pytest.mark.parametrize("tokens", [1, 5, 23])
def test_panel_path_equals_each_experts_dense_product(qtype, k, tokens):
    """The routed panel kernel, row by row, bit for bit the dense panel product of the chosen
    expert (the same tiles; rows regrouped and gathered back), and near the float64 reference;
    23 tokens choosing 4 of 12 experts puts several register tiles in one expert's group."""
    module = native_loader.load()
    if not module.interleaved_supports(int(qtype)):
        pytest.skip("no panel kernels in this build")
    n = 48
    packed, dense = _experts(qtype, n=n, k=k)
    panels = interleave_experts(packed, int(qtype))
    assert panels is not None and panels.shape[0] == E * n // 16
    bias = torch.randn(E, n)
    lin = PackedExperts(
        torch.empty(packed.shape, dtype=torch.uint8, device="meta"),
        int(qtype),
        k,
        bias=bias,
        panels=panels,
    )
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((tokens, k)).astype(np.float32))
    src, expert = _routing(tokens, 4)
    got = lin(x, src, expert)
    for r, (s, e) in enumerate(zip(src.tolist(), expert.tolist(), strict=True)):
        one = module.interleave(packed[e].contiguous(), int(qtype))
        want = module.imatmul_many(x[s : s + 1].contiguous(), [one], [n], int(qtype))[0][0]
        assert torch.equal(got[r], want + bias[e]), f"row {r} (token {s}, expert {e})"
    ref = (
        _reference(x.numpy(), dense, src.tolist(), expert.tolist(), q8=False) + bias[expert].numpy()
    )
    np.testing.assert_allclose(got.numpy(), ref, rtol=0.05, atol=0.05 * np.abs(ref).max())


@needs_native
def test_panel_path_streams_each_chosen_expert_once():
    packed, _ = _experts(T.Q4_0, n=32)
    panels = interleave_experts(packed, int(T.Q4_0))
    if panels is None:
        pytest.skip("no panel kernels in this build")
    lin = PackedExperts(packed, int(T.Q4_0), K, panels=panels)
    src, expert = _routing(16, 4)
    expert_stats(reset=True)
    lin(torch.randn(16, K), src, expert)
    stats = expert_stats(reset=True)
    chosen = int(torch.unique(expert).numel())
    assert (stats["calls"], stats["streams"]) == (1, chosen)
    assert stats["bytes"] == chosen * panels.shape[0] // E * panels.shape[1]


def test_experts_panels_need_whole_panels_per_expert():
    packed, _ = _experts(T.Q4_0)  # N = 40: a panel would hold two experts' rows
    assert interleave_experts(packed, int(T.Q4_0)) is None


@needs_native
def test_grouped_python_path_for_other_types():
    packed, dense = _experts(T.Q5_0, k=256)  # a type moe.cpp lacks: one qmatmul per expert
    x = np.random.default_rng(3).standard_normal((3, 256)).astype(np.float32)
    src, expert = _routing(3, 2)
    lin = PackedExperts(packed, int(T.Q5_0), 256, bias=torch.ones(E, N))
    assert lin._module is None
    got = lin(torch.from_numpy(x), src, expert).numpy()
    want = _reference(x, dense, src.tolist(), expert.tolist(), q8=False) + 1.0
    np.testing.assert_allclose(got, want, rtol=0.01, atol=0.01 * np.abs(want).max())


@needs_native
def test_each_chosen_expert_streams_once_per_call():
    """16 decodes choosing 4 of 12 experts each: gate and up read each chosen expert once."""
    gate, _ = _experts(T.MXFP4, seed=4)
    up, _ = _experts(T.MXFP4, seed=5)
    lins = [PackedExperts(w, int(T.MXFP4), K) for w in (gate, up)]
    src, expert = _routing(16, 4)
    x = torch.randn(16, K)
    expert_stats(reset=True)
    expert_matmuls(lins, x, src, expert)
    stats = expert_stats(reset=True)
    chosen = int(torch.unique(expert).numel())
    assert stats["calls"] == 1
    assert stats["streams"] == 2 * chosen  # not 16 · 4 · 2 row reads
    assert stats["bytes"] == 2 * chosen * N * lins[0].row_bytes


def test_triton_grouped_kernel_interpreted():
    pytest.importorskip("kernels.triton")  # sets TRITON_INTERPRET=1 without CUDA
    from kernels.triton.moe import moe_matmul

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for qtype, k in ((T.MXFP4, 64), (T.Q5_0, 64)):
        packed, dense = _experts(qtype, n=20, k=k)
        x = np.random.default_rng(6).standard_normal((3, k)).astype(np.float32)
        src, expert = _routing(3, 2)
        got = moe_matmul(
            torch.from_numpy(x).to(device),
            packed.to(device),
            int(qtype),
            src.to(device),
            expert.to(device),
        ).cpu()
        want = _reference(x, dense[:, :20], src.tolist(), expert.tolist(), q8=False)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _split_ffn(gate, up, down, x, ids, weights, activation):
    """The routed feed-forward as MoE runs it without imoe_ffn: expert_matmuls for gate/up,
    the activation in torch (the silu of small_ops.act_mul), expert_matmuls for down, then the
    weighted sum over the k choices."""
    from runtime.models.moe import swiglu_oai

    n, k = ids.shape
    expert = ids.reshape(-1)
    g, u = expert_matmuls([gate, up], x, torch.arange(n).repeat_interleave(k), expert)
    act = swiglu_oai(g, u) if activation == "swiglu_oai" else torch.nn.functional.silu(g) * u
    out = expert_matmuls([down], act, torch.arange(n * k), expert)[0].view(n, k, -1)
    return torch.einsum("tke,tk->te", out, weights)


@needs_native
@pytest.mark.parametrize(
    ("gu_type", "down_type", "activation", "biased"),
    [
        (T.Q4_0, T.Q4_0, "silu", False),
        (T.Q4_K, T.Q6_K, "silu", False),  # Qwen3-30B-A3B Q4_K_M: gate/up Q4_K, down Q6_K
        (T.MXFP4, T.MXFP4, "swiglu_oai", True),  # gpt-oss
    ],
)
@pytest.mark.parametrize("tokens", [1, 7])
def test_fused_routed_ffn_equals_the_split_path(gu_type, down_type, activation, biased, tokens):
    """imoe_ffn (one native call) against the same products, activation and weighted sum
    taken step by step: the products are bit-identical, so only the activation's exp and the
    order of the weighted sum may differ (float32 rounding)."""
    from kernels.experts import routed_ffn

    if not native_loader.load().interleaved_supports(int(gu_type)):
        pytest.skip("no panel kernels in this build")
    kdim, f = 256, 512
    g_packed, _ = _experts(gu_type, seed=11, n=f, k=kdim)
    u_packed, _ = _experts(gu_type, seed=12, n=f, k=kdim)
    d_packed, _ = _experts(down_type, seed=13, n=kdim, k=f)
    gen = torch.Generator().manual_seed(5)

    def experts(packed, qtype, width, rows):
        bias = torch.randn(E, rows, generator=gen) if biased else None
        return PackedExperts(
            packed, int(qtype), width, bias=bias, panels=interleave_experts(packed, int(qtype))
        )

    gate, up = experts(g_packed, gu_type, kdim, f), experts(u_packed, gu_type, kdim, f)
    down = experts(d_packed, down_type, f, kdim)
    x = torch.randn(tokens, kdim, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:4] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 4, generator=gen), -1)
    expert_stats(reset=True)
    got = routed_ffn(gate, up, down, x, ids, weights, activation)
    stats = expert_stats(reset=True)
    assert got is not None
    chosen = int(torch.unique(ids).numel())
    assert (stats["calls"], stats["streams"]) == (1, 3 * chosen)  # each expert read once
    want = _split_ffn(gate, up, down, x, ids, weights, activation)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * float(want.abs().max()))


@needs_native
@pytest.mark.parametrize(
    ("softmax_first", "normalize", "biased"), [(True, True, False), (False, False, True)]
)
def test_native_router_top_k_matches_torch(softmax_first, normalize, biased):
    """imoe_route (qwen3moe: softmax → top-k → normalized; gpt-oss: biased, top-k → softmax)
    against the torch route MoE takes for prefill."""
    from kernels.experts import route_topk
    from kernels.linear import PackedLinear

    gen = torch.Generator().manual_seed(3)
    n_exp, kdim, k = 64, 256, 8
    w = torch.randn(n_exp, kdim, generator=gen)
    bias = torch.randn(n_exp, generator=gen) if biased else None
    router = PackedLinear(w.view(torch.uint8), int(T.F32), kdim, bias)
    h = torch.randn(5, kdim, generator=gen)
    got = route_topk(router, h, k, softmax_first, normalize)
    assert got is not None
    logits = h @ w.T + (bias if biased else 0)
    if softmax_first:
        want_w, want_ids = torch.topk(torch.softmax(logits, -1), k, -1)
    else:
        top, want_ids = torch.topk(logits, k, -1)
        want_w = torch.softmax(top, -1)
    if normalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert torch.equal(got[1], want_ids)
    torch.testing.assert_close(got[0], want_w, rtol=1e-5, atol=1e-6)
    assert route_topk(router, torch.randn(17, kdim), k, softmax_first, normalize) is None
