"""The Triton kernels against their references on random inputs of every supported type.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before kernels.triton is imported: triton.jit reads it when a kernel is defined); with CUDA
the same tests run on the GPU. The interpreter is slow, so shapes are small but chosen to
exercise the masks: N, M and context lengths that are not multiples of the tile sizes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):  # triton was imported before the flag
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set; set it in the "
            "environment of this test run",
            pytrace=False,
        )

from kernels.attention import attention  # noqa: E402
from kernels.norm import rms_norm as rms_norm_ref  # noqa: E402
from kernels.triton import (  # noqa: E402
    PAGE,
    act_mul,
    add_rms_norm,
    dequant_rows,
    interpreted,
    kv_write,
    paged_attention_decode,
    qmatmul,
    rms_norm,
    rope_qk,
)
from kernels.triton.ggml_blocks import GEOMETRY  # noqa: E402
from quant.dequant import dequantize  # noqa: E402

DEVICE = "cpu" if interpreted() else "cuda"
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
TYPES |= {"Q2_K": 10, "Q3_K": 11, "Q5_K": 13, "IQ4_NL": 20, "IQ4_XS": 23}
# Byte offsets of each type's float16 fields (scales, mins), set to sane values below.
F16_FIELDS = {2: (0,), 3: (0, 2), 6: (0,), 8: (0,), 12: (0, 2), 14: (208,)}
F16_FIELDS |= {10: (80, 82), 11: (108,), 13: (0, 2), 20: (0,), 23: (0,)}
EPS32, EPS16 = 2.0**-24, 2.0**-11  # unit roundoff of float32, float16


def random_weight(qtype: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, row_bytes) uint8 rows of random blocks: every quant bit pattern is valid; the
    float16 fields get small positive values (random bytes could be inf or NaN)."""
    qk, size = GEOMETRY[qtype]
    blocks = torch.randint(0, 256, (n, k // qk, size), dtype=torch.uint8, generator=gen)
    for at in F16_FIELDS[qtype]:
        d = (torch.rand(n, k // qk, generator=gen) * 0.02 + 1e-3).half()
        blocks[:, :, at : at + 2] = d.view(torch.uint8).view(n, k // qk, 2)
    return blocks.view(n, -1)


def check_matmul(qtype: int, m: int, tol_per_term: float) -> None:
    gen = torch.Generator().manual_seed(1000 * qtype + m)
    n, k = 80, 512  # 80: not a multiple of the 64- or 16-row tiles
    w = random_weight(qtype, n, k, gen)
    x = torch.randn(m, k, generator=gen)
    dense = dequantize(w, qtype).double()  # (n, k), the reference weights
    y = qmatmul(x.to(DEVICE), w.to(DEVICE), qtype).cpu().double()
    ref = x.double() @ dense.t()
    # each error is bounded by tol_per_term · Σ_k |x_k w_k| (rounding of the K products)
    bound = tol_per_term * (x.double().abs() @ dense.abs().t()) + 1e-30
    assert y.shape == (m, n)
    worst = ((y - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g}× the bound"


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_matches_dequantized_reference(name: str, m: int) -> None:
    # float32 accumulation of K products: |error| ≤ K·u32·Σ|x·w| (the standard dot-product
    # bound, u32 = 2^-24), the dequantized values themselves being exact.
    check_matmul(TYPES[name], m, 512 * EPS32)


@pytest.mark.parametrize("name", TYPES)
def test_gemm_matches_dequantized_reference(name: str) -> None:
    # x and w are rounded to float16 for tl.dot (relative error u16 = 2^-11 each, so 2·u16
    # per product), then accumulated in float32 (K·u32, negligible beside it): 3·u16 bound.
    check_matmul(TYPES[name], 20, 3 * EPS16)


@pytest.mark.parametrize("name", TYPES)
def test_dequant_rows_bit_exact(name: str) -> None:
    qtype = TYPES[name]
    gen = torch.Generator().manual_seed(qtype)
    w = random_weight(qtype, 10, 512, gen)
    ids = torch.tensor([7, 0, 7, 9])
    got = dequant_rows(w.to(DEVICE), ids.to(DEVICE), qtype).cpu()
    assert torch.equal(got, dequantize(w[ids], qtype))  # the same float ops, in order


def test_unsupported_types_fall_back_to_dequantize() -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 64, generator=gen).half()
    x = torch.randn(2, 64, generator=gen)
    y = qmatmul(x.to(DEVICE), w.view(torch.uint8).to(DEVICE), 1).cpu()  # F16
    torch.testing.assert_close(y, x @ w.float().t(), rtol=1e-5, atol=1e-5)


def test_qmatmul_rejects_wrong_row_bytes() -> None:
    with pytest.raises(ValueError, match="do not hold 64 Q4_0"):
        qmatmul(torch.zeros(1, 64), torch.zeros(4, 18, dtype=torch.uint8), 2)


def paged_case(lens: list[int], n_head: int, n_head_kv: int, d: int, gen: torch.Generator):
    """Random pools with each sequence's pages at shuffled block ids; unused slots hold NaN
    (the kernel must never read past a context)."""
    max_blocks = max(-(-n // PAGE) for n in lens)
    num_blocks = len(lens) * max_blocks + 3
    order = torch.randperm(num_blocks, generator=gen)
    tables = order[: len(lens) * max_blocks].view(len(lens), max_blocks).to(torch.int32)
    k_pool = torch.full((num_blocks, PAGE, n_head_kv, d), float("nan"), dtype=torch.float16)
    v_pool = k_pool.clone()
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        blocks, offs = tables[b, pos // PAGE].long(), pos % PAGE
        k_pool[blocks, offs] = torch.randn(n, n_head_kv, d, generator=gen).half()
        v_pool[blocks, offs] = torch.randn(n, n_head_kv, d, generator=gen).half()
    q = torch.randn(len(lens), n_head, d, generator=gen)
    return q, k_pool, v_pool, tables


@pytest.mark.parametrize(
    "n_head,n_head_kv,d,window", [(4, 2, 32, 0), (4, 1, 64, 20), (3, 3, 16, 0)]
)
def test_paged_attention_matches_reference(n_head, n_head_kv, d, window) -> None:
    gen = torch.Generator().manual_seed(n_head * 100 + d + window)
    lens = [1, 17, 45]  # one token; a page and one; a partly filled third page
    q, k_pool, v_pool, tables = paged_case(lens, n_head, n_head_kv, d, gen)
    scale = d**-0.5
    out = paged_attention_decode(
        q.to(DEVICE),
        k_pool.to(DEVICE),
        v_pool.to(DEVICE),
        tables.to(DEVICE),
        torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        scale,
        window,
    ).cpu()
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        keys = k_pool[tables[b, pos // PAGE].long(), pos % PAGE].float()  # (n, Hkv, D)
        values = v_pool[tables[b, pos // PAGE].long(), pos % PAGE].float()
        ref = attention(q[b : b + 1], keys, values, n - 1, window, scale).view(n_head, d)
        # float32 softmax and sums over ≤ 45 exactly-represented f16 values: ~1e-6 relative;
        # 1e-5 leaves room for the online softmax's different summation order
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


def test_kv_write_places_rows_at_their_slots() -> None:
    gen = torch.Generator().manual_seed(3)
    k_pool = torch.zeros(4, PAGE, 2, 8, dtype=torch.float16)
    v_pool = torch.zeros(4, PAGE, 2, 4, dtype=torch.float16)
    k, v = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 4, generator=gen)
    slots = torch.tensor([2 * PAGE + 5, -1, 0 * PAGE + 15])  # row 1 is padding
    kp, vp = k_pool.to(DEVICE), v_pool.to(DEVICE)
    kv_write(k.to(DEVICE), v.to(DEVICE), kp, vp, slots.to(DEVICE))
    k_pool[2, 5], v_pool[2, 5] = k[0].half(), v[0].half()
    k_pool[0, 15], v_pool[0, 15] = k[2].half(), v[2].half()
    assert torch.equal(kp.cpu(), k_pool) and torch.equal(vp.cpu(), v_pool)  # exact: RNE both


def q8_pools(n_blocks: int, n_head_kv: int, d: int, dv: int):
    """A q8_0 KVPool's slabs (the CPU reference writer and reader) and their GPU pages."""
    from loaders.config import ModelConfig
    from runtime.kv.kv_pool import KVPool

    config = ModelConfig(
        arch="llama",
        n_layer=1,
        n_embd=64,
        n_ff=64,
        n_head=n_head_kv,
        n_head_kv=n_head_kv,
        head_dim=d,
        head_dim_v=dv,
        n_ctx_train=256,
        vocab_size=8,
        rms_eps=1e-6,
        rope_base=1e4,
        rope_neox=False,
        rope_scale=1.0,
        rope_base_swa=1e4,
        sliding_window=0,
        swa_layers=(False,),
        activation="silu",
        qk_norm=False,
        post_norms=False,
        embed_scale=1.0,
        attn_scale=d**-0.5,
        tied_head=False,
        attn_bias=False,
    )
    return KVPool(config, n_blocks, "q8_0")


def test_kv_write_q8_0_stores_the_cpu_writers_bits() -> None:
    """The Triton q8_0 write gives the int8 values and float16 scales of kv_pool's CPU
    write, ties (x·(1/d) exactly k + 0.5) rounded to even as torch.round does."""
    gen = torch.Generator().manual_seed(11)
    k, v = torch.randn(4, 2, 64, generator=gen) * 3, torch.randn(4, 2, 32, generator=gen)
    k[0, 0, :32] = torch.cat([torch.tensor([127.0]), torch.arange(-15, 16) + 0.5])  # d = 1
    k[3, 1, 32:] = 0.0  # an all-zero block: scale 0, values 0
    slots = torch.tensor([PAGE + 3, -1, 0, 2 * PAGE + 15])
    want, keep = q8_pools(3, 2, 64, 32), slots >= 0
    want.write(0, slots[keep], k[keep], v[keep])  # the CPU path
    pages = [torch.zeros_like(t).to(DEVICE) for t in want.pages(0)]
    kv_write(k.to(DEVICE), v.to(DEVICE), pages[0], pages[1], slots.to(DEVICE), *pages[2:])

    def bits(t: torch.Tensor) -> torch.Tensor:  # (slots, ...) as integers
        t = t.cpu().flatten(0, 1)
        return t.view(torch.uint8) if t.dtype == torch.int8 else t.view(torch.int16)

    for got, ref in zip(pages, want.pages(0), strict=True):
        assert torch.equal(bits(got)[slots[keep]], bits(ref)[slots[keep]])
        assert not bits(got)[PAGE + 4].any()  # a slot no row names stays as it was
    ties = pages[0].cpu().flatten(0, 1)[PAGE + 3, 0, :8].tolist()  # -14.5, -13.5, … to even
    assert ties == [127, -14, -14, -12, -12, -10, -10, -8]


@pytest.mark.parametrize("window", [0, 20])
def test_paged_attention_reads_q8_0_pages(window: int) -> None:
    gen = torch.Generator().manual_seed(12)
    lens, n_head, n_head_kv, d = [1, 17, 45], 4, 2, 64
    q, k_f16, v_f16, tables = paged_case(lens, n_head, n_head_kv, d, gen)
    pool = q8_pools(k_f16.shape[0], n_head_kv, d, d)
    slots = torch.arange(k_f16.shape[0] * PAGE)
    pool.write(0, slots, k_f16.flatten(0, 1).float(), v_f16.flatten(0, 1).float())
    kp, vp, ks, vs = (t.to(DEVICE) for t in pool.pages(0))
    out = paged_attention_decode(
        q.to(DEVICE),
        kp,
        vp,
        tables.to(DEVICE),
        torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        d**-0.5,
        window,
        ks,
        vs,
    ).cpu()
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        at = tables[b, pos // PAGE].long() * PAGE + pos % PAGE
        keys, values = pool.read(0, at)  # (n, Hkv, D) float32, dequantized on the CPU
        ref = attention(q[b : b + 1], keys, values, n - 1, window, d**-0.5).view(n_head, d)
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_reference_and_adds_residual() -> None:
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(5, 96, generator=gen), torch.randn(96, generator=gen)
    res = torch.randn(5, 96, generator=gen)
    # float32 mean of 96 squares, summed in a different order: a few ulps
    y = rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6).cpu()
    torch.testing.assert_close(y, rms_norm_ref(x, w, 1e-6), rtol=1e-6, atol=1e-6)
    r = res.clone().to(DEVICE)  # written in place
    y = rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6, residual=r).cpu()
    torch.testing.assert_close(r.cpu(), x + res, rtol=0, atol=0)
    torch.testing.assert_close(y, rms_norm_ref(x + res, w, 1e-6), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_gemv_large_shape_on_cuda(name: str) -> None:
    """A real layer shape on the GPU (too slow for the interpreter)."""
    if interpreted():
        pytest.skip("TRITON_INTERPRET is set: this test is for compiled CUDA kernels")
    qtype, gen = TYPES[name], torch.Generator().manual_seed(9)
    w = random_weight(qtype, 4096, 4096, gen)
    x = torch.randn(1, 4096, generator=gen)
    y = qmatmul(x.cuda(), w.cuda(), qtype).cpu().double()
    dense = dequantize(w, qtype).double()
    bound = 4096 * EPS32 * (x.double().abs() @ dense.abs().t())
    assert ((y - x.double() @ dense.t()).abs() <= bound).all()


@pytest.mark.parametrize(
    "model,names",
    [
        ("smollm2", ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]),  # Q4_1
        (
            "gemma3",
            [
                "blk.0.attn_q.weight",
                "blk.0.attn_output.weight",  # Q5_0, Q4_K
                "blk.0.ffn_down.weight",
                "blk.0.attn_v.weight",
            ],
        ),  # Q6_K, Q8_0
    ],
)
def test_gemv_on_real_model_tensors(model: str, names: list[str], request) -> None:
    """The real files' blocks (scales as trained, not random) through the GEMV."""
    from loaders.gguf_file import GGUFFile

    path = request.getfixturevalue(f"{model}_path")
    gen = torch.Generator().manual_seed(7)
    with GGUFFile(path) as g:
        for name in names:
            info, w = g.info(name), g.tensor(name)[:128].clone()  # (128, row_bytes) uint8
            x = torch.randn(1, info.shape[0], generator=gen)
            dense = dequantize(w, info.ggml_type).double()
            y = qmatmul(x.to(DEVICE), w.to(DEVICE), info.ggml_type).cpu().double()
            bound = info.shape[0] * EPS32 * (x.double().abs() @ dense.abs().t())
            assert ((y - x.double() @ dense.t()).abs() <= bound).all(), name


def rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """kernels/small_ops.rms_norm's torch formula over the last dim."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_rms_norm_takes_leading_dims() -> None:
    gen = torch.Generator().manual_seed(11)
    # (T, H, D) per-head q/k norm, read through a transposed (non-contiguous) view
    x = torch.randn(4, 3, 64, generator=gen).transpose(0, 1)  # (3, 4, 64)
    w = torch.randn(64, generator=gen)
    y = rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6).cpu()
    assert y.shape == (3, 4, 64)
    torch.testing.assert_close(y, rms_ref(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    res = torch.randn(3, 4, 64, generator=gen)
    r = res.clone().to(DEVICE)  # written in place
    y = rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6, residual=r).cpu()
    torch.testing.assert_close(r.cpu(), x + res, rtol=0, atol=0)
    torch.testing.assert_close(y, rms_ref(x + res, w, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 96), (1, 40)])
def test_add_rms_norm_matches_reference_out_of_place(shape) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x, a = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    w = torch.randn(shape[-1], generator=gen)
    xd, ad = x.to(DEVICE), a.to(DEVICE)
    s, h = add_rms_norm(xd, ad, w.to(DEVICE), 1e-5)
    assert s.shape == h.shape == shape
    assert torch.equal(xd.cpu(), x) and torch.equal(ad.cpu(), a)  # inputs untouched
    torch.testing.assert_close(s.cpu(), x + a, rtol=0, atol=0)  # one float32 add: exact
    torch.testing.assert_close(h.cpu(), rms_ref(x + a, w, 1e-5), rtol=1e-5, atol=1e-6)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """kernels/small_ops.rope's torch formula: x (T, H, D), cos/sin (T, 1, D/2)."""
    half = x.shape[-1] // 2
    if neox:
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_rope_qk_matches_reference(neox: bool, d: int) -> None:
    gen = torch.Generator().manual_seed(d + neox)
    t, h, hkv = 3, 4, 2
    # q: a view of a fused QKV matmul's output (rows strided by (H + 2·Hkv)·D);
    # k: a transposed view, so that D is not its last stride either
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=gen).to(DEVICE)
    q = qkv[:, : h * d].view(t, h, d)
    k = torch.randn(t, d, hkv, generator=gen).to(DEVICE).transpose(1, 2)  # (T, Hkv, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    pos = torch.tensor([0.0, 5.0, 1000.0])[:, None]
    angles = pos * 10000.0 ** (-torch.arange(d // 2, dtype=torch.float32) / (d // 2))
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # (T, 1, D/2)
    rq, rk = rope_qk(q, k, cos.to(DEVICE), sin.to(DEVICE), neox)
    assert rq.shape == (t, h, d) and rk.shape == (t, hkv, d)
    assert rq.is_contiguous() and rk.is_contiguous()
    q, k = q.cpu(), k.cpu()
    torch.testing.assert_close(rq.cpu(), rope_ref(q, cos, sin, neox), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rk.cpu(), rope_ref(k, cos, sin, neox), rtol=1e-5, atol=1e-6)
    # (T, D/2) tables give the same rotation
    rq2, rk2 = rope_qk(q.to(DEVICE), k.to(DEVICE), cos[:, 0].to(DEVICE), sin[:, 0].to(DEVICE), neox)
    assert torch.equal(rq2, rq) and torch.equal(rk2, rk)


# exp(±200) overflows to inf in the interpreter's numpy, by design (g / inf = 0): no warning
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("gelu", [False, True])
def test_act_mul_matches_torch(gelu: bool) -> None:
    gen = torch.Generator().manual_seed(12 + gelu)
    # gate and up: the two halves of a fused gate_up output (non-contiguous views);
    # 5 × 300 elements: two 1024-element blocks, the second partly masked
    gate_up = torch.randn(5, 600, generator=gen) * 4
    gate_up[0, :10] = torch.tensor(
        [30.0, -30.0, 20.0, -20.0, 10.0, -10.0, 100.0, -100.0, 0.0, -3.0]
    )  # far tails: no inf/NaN from exp
    g, up = gate_up[:, :300], gate_up[:, 300:]
    y = act_mul(g.to(DEVICE), up.to(DEVICE), gelu).cpu()
    ref = (F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * up
    assert y.shape == (5, 300) and torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_small_kernels_reject_bad_shapes() -> None:
    x = torch.zeros(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="same T and D"):
        rope_qk(x, torch.zeros(3, 3, 8, device=DEVICE), x[:, :1, :4], x[:, :1, :4], False)
    with pytest.raises(ValueError, match="cos must be"):
        rope_qk(x, x, x[:, :1, :3], x[:, :1, :3], True)
    with pytest.raises(ValueError, match="must be even"):
        rope_qk(x[..., :7], x[..., :7], x[:, :1, :3], x[:, :1, :3], True)
    with pytest.raises(ValueError, match="same shape"):
        act_mul(x, x[:1], False)
    with pytest.raises(ValueError, match="same shape"):
        add_rms_norm(x, x[:1], torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="weight \\(D,\\)"):
        rms_norm(x, torch.ones(4, device=DEVICE), 1e-6)


@pytest.mark.parametrize("m", [1, 5])
def test_stacked_linears_equal_separate_ones(m: int) -> None:
    """q/k/v stacked into one device weight (one launch) give each member's own output, bit
    for bit (every output row is computed alone in both), biases included; a group run out of
    order or in part goes member by member."""
    from kernels.linear import matmuls
    from kernels.triton_linear import TritonLinear, run_stacked

    gen = torch.Generator().manual_seed(7)
    weights = [random_weight(2, n, 128, gen) for n in (64, 32, 48)]
    biases = [torch.randn(n, generator=gen) for n in (64, 32, 48)]
    device = torch.device(DEVICE)
    members = TritonLinear.stacked(weights, 2, 128, biases, device)
    alone = [TritonLinear(w, 2, 128, b, device) for w, b in zip(weights, biases, strict=True)]
    x = torch.randn(m, 128, generator=gen).to(DEVICE)
    for got, want in zip(matmuls(members, x), [lin(x) for lin in alone], strict=True):
        assert torch.equal(got, want)
    assert (
        members[0].weight.data_ptr() + 64 * members[0].weight.shape[1]
        == members[1].weight.data_ptr()
    )  # views of one stack
    assert run_stacked(members[::-1], x) is None and run_stacked(members[:2], x) is None
    assert run_stacked(alone, x) is None
