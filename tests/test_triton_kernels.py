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

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):  # triton was imported before the flag
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; set it in the "
                    "environment of this test run", pytrace=False)

from kernels.attention import attention  # noqa: E402
from kernels.norm import rms_norm as rms_norm_ref  # noqa: E402
from kernels.triton import (  # noqa: E402
    PAGE,
    dequant_rows,
    interpreted,
    kv_write,
    paged_attention_decode,
    qmatmul,
    rms_norm,
)
from kernels.triton.ggml_blocks import GEOMETRY  # noqa: E402
from quant.dequant import dequantize  # noqa: E402

DEVICE = "cpu" if interpreted() else "cuda"
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
# Byte offsets of each type's float16 fields (scales, mins), set to sane values below.
F16_FIELDS = {2: (0,), 3: (0, 2), 6: (0,), 8: (0,), 12: (0, 2), 14: (208,)}
EPS32, EPS16 = 2.0**-24, 2.0**-11  # unit roundoff of float32, float16


def random_weight(qtype: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, row_bytes) uint8 rows of random blocks: every quant bit pattern is valid; the
    float16 fields get small positive values (random bytes could be inf or NaN)."""
    qk, size = GEOMETRY[qtype]
    blocks = torch.randint(0, 256, (n, k // qk, size), dtype=torch.uint8, generator=gen)
    for at in F16_FIELDS[qtype]:
        d = (torch.rand(n, k // qk, generator=gen) * 0.02 + 1e-3).half()
        blocks[:, :, at:at + 2] = d.view(torch.uint8).view(n, k // qk, 2)
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


@pytest.mark.parametrize("n_head,n_head_kv,d,window", [(4, 2, 32, 0), (4, 1, 64, 20),
                                                       (3, 3, 16, 0)])
def test_paged_attention_matches_reference(n_head, n_head_kv, d, window) -> None:
    gen = torch.Generator().manual_seed(n_head * 100 + d + window)
    lens = [1, 17, 45]  # one token; a page and one; a partly filled third page
    q, k_pool, v_pool, tables = paged_case(lens, n_head, n_head_kv, d, gen)
    scale = d**-0.5
    out = paged_attention_decode(q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE),
                                 tables.to(DEVICE), torch.tensor(lens, dtype=torch.int32,
                                                                 device=DEVICE),
                                 scale, window).cpu()
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        keys = k_pool[tables[b, pos // PAGE].long(), pos % PAGE].float()  # (n, Hkv, D)
        values = v_pool[tables[b, pos // PAGE].long(), pos % PAGE].float()
        ref = attention(q[b:b + 1], keys, values, n - 1, window, scale).view(n_head, d)
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


@pytest.mark.parametrize("model,names", [
    ("smollm2", ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]),  # Q4_1
    ("gemma3", ["blk.0.attn_q.weight", "blk.0.attn_output.weight",  # Q5_0, Q4_K
                "blk.0.ffn_down.weight", "blk.0.attn_v.weight"]),  # Q6_K, Q8_0
])
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
