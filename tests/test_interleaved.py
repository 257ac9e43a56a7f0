"""kernels/native/interleaved.cpp: GGML rows re-laid out in 16-row panels, and the AVX-512 and
AVX2 kernels over them (bit-identical to each other) (through kernels/linear.py, loaders/gguf_file.py and runtime/model.py).

Oracle: kernels/act_quant_ref.py (llama.cpp's CPU arithmetic in plain torch: activations
quantized per block, exact integer block sums, float32 scale products, summed in float64).

Tolerance against the oracle: |y − want| ≤ 1e-5 · Σ|terms| per output. Both compute the same
per-block terms (exact integer sums times the same float32 scale products d_w · d_x); the
kernel adds them in order, block after block, in float32 (one fma per term). Summing n terms
in float32 errs by ≤ n · 2^-24 · Σ|terms| (each addition rounds once, relative to a partial
sum ≤ Σ|terms|), plus ≤ 2^-24 · |term| per term where the kernel rounds a term's inputs
differently (a K-quant super-block's int32 sum above 2^24 converted to float; Q4_1's min
product m_w · s_x, exact inside the fma, rounded in the oracle): ≤ (n + 1) · 2^-24 ·
Σ|terms|. For the K = 512 rows here n is 16 (Q4_0, Q5_0, Q8_0: 16 blocks), 32 (Q4_1: 16
blocks × scale and min terms), 4 (Q4_K, Q5_K: 2 super-blocks × 2 terms) or 2 (Q6_K, Q3_K,
IQ4_XS), so the bound
is ≤ 33 · 2^-24 ≈ 2.0e-6 · Σ|terms|; 1e-5 leaves a factor 5 (observed ≈ 2e-7). MXFP4's
K = 2880 rows (gpt-oss) have 90 blocks: ≤ 91 · 2^-24 ≈ 5.4e-6 · Σ|terms|.

Everything else is exact: the panels hold the same bits (deinterleave gives the GGML rows
back), and a token's output row depends on neither the other tokens of the call, the other
weights of an imatmul_many call, nor the thread count (compared with torch.equal).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_native_qmatmul import activations
from test_native_qmatmul import weights as ggml_weights

from kernels import act_quant_ref as ref
from kernels import linear as linear_mod
from kernels import native_loader
from kernels.linear import PackedLinear, interleave, matmuls
from quant.dequant import dequantize
from quant.formats import block_format
from quant.quantize import quantize

# the types with a panel layout
PANELED = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "Q3_K", "Q5_K", "IQ4_XS", "MXFP4"]
R = 16  # rows per panel
N, K = 37, 512  # 37 rows: two full panels and a partial one of 5 rows


def seed_of(name: str, *more: int) -> int:
    return 1000 * PANELED.index(name) + sum(more)


def weights(name: str, n: int, k: int, seed: int) -> torch.Tensor:
    """(n, row_bytes) packed rows (test_native_qmatmul's). MXFP4: random nibbles (every
    value, -0 too) and E8M0 scales 2^(e − 128) mostly for e in 100..140, some 0, 1 and 2
    (the subnormal halves and the first normal one), never so large that a product overflows."""
    if name != "MXFP4":
        return ggml_weights(name, n, k, seed)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n * (k // 32), 17), dtype=np.uint8)
    e = rng.integers(100, 141, len(blocks))
    rare = rng.random(len(blocks)) < 0.05
    e[rare] = rng.choice([0, 1, 2], int(rare.sum()))
    blocks[:, 0] = e
    return torch.from_numpy(blocks.reshape(n, -1))


def row_bytes(name: str, k: int) -> int:
    return block_format(T[name]).row_bytes(k)


@pytest.fixture(scope="module", params=["native", "scalar"])
def build(request):
    """This CPU's best build and the portable scalar one: interleave/deinterleave are in both."""
    module = native_loader.load(None if request.param == "native" else "scalar")
    if module is None:
        pytest.skip(f"the {request.param} build could not be made (no compiler?); see the log")
    return module


def need_kernel(module, name: str) -> None:
    if not module.interleaved_supports(int(T[name])):
        pytest.skip(
            f"this build ({native_loader.cpu_isa()}) has no panel kernel for {name}: "
            "imatmul needs AVX2 (or AVX-512 F/BW/VL and VNNI)"
        )


def imatmul(module, x: torch.Tensor, panels: torch.Tensor, n: int, name: str) -> torch.Tensor:
    return module.imatmul_many(x, [panels], [n], int(T[name]))[0]


def check_same_numerics(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, name: str) -> None:
    want, magnitude = ref.reference(x, w, int(T[name]))
    assert y.shape == want.shape and y.dtype == torch.float32
    err = (y.double() - want).abs()
    worst = (err / magnitude.clamp_min(1e-30)).max().item()
    assert (err <= 1e-5 * magnitude + 1e-30).all(), f"{name}: error/Σ|terms| up to {worst:.2e}"


# ---------------------------------------------------------------- 1. layout round trip


@pytest.mark.parametrize("name", PANELED)
@pytest.mark.parametrize("k", [512, 768])
def test_round_trip_gives_the_ggml_rows_back(build, name, k):
    qt = int(T[name])
    w = weights(name, N, k, seed_of(name, k))
    panels = build.interleave(w, qt)
    pbytes = build.panel_bytes(qt, k)
    assert panels.dtype == torch.uint8 and panels.shape == (-(-N // R), pbytes)
    # The same bytes per row as GGML's, except where packed 6-bit scales become bytes: Q4_K,
    # Q5_K (12 bytes of scales and mins → 16 per super-block), Q3_K (12 → 16, and its fp16 d
    # moves), IQ4_XS (6 → 8).
    grown = {"Q4_K": (148, 144), "Q5_K": (180, 176), "Q3_K": (114, 110), "IQ4_XS": (138, 136)}
    new, old = grown.get(name, (1, 1))
    assert pbytes * old == R * row_bytes(name, k) * new

    assert torch.equal(build.deinterleave(panels, torch.arange(N), qt, k, N), w)
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:20]
    ids = torch.cat([ids, ids[:3]])  # repeats too
    assert torch.equal(build.deinterleave(panels, ids, qt, k, N), w[ids])
    # The partial last panel's missing rows are zero bytes in the panel: rows of zero scales
    # (their quantized values decode to the offset, e.g. Q8_0's byte 0 is -128), i.e. zeros.
    full = panels.shape[0] * R
    pad = build.deinterleave(panels, torch.arange(N, full), qt, k, full)
    assert pad.shape == (full - N, w.shape[1])
    assert not dequantize(pad, qt).any()


@pytest.mark.parametrize("name", PANELED)
def test_scalar_and_native_builds_make_the_same_panels(native, name):
    scalar = native_loader.load("scalar")
    if scalar is None:
        pytest.skip("the scalar build could not be made (no compiler?)")
    w = weights(name, N, K, seed_of(name, 7))
    assert torch.equal(native.interleave(w, int(T[name])), scalar.interleave(w, int(T[name])))


# ---------------------------------------------------------------- 2. against the oracle


@pytest.fixture(scope="module", params=["native", "avx2"])
def kernel(request):
    """The panel kernels of this CPU's best build, and of the AVX2 build (8 rows per pass,
    maddubs instead of vpdpbusd) where the best is another."""
    if request.param == "avx2" and native_loader.cpu_isa() in ("avx2", "scalar"):
        pytest.skip("the native build is the AVX2 one here, or this CPU has no AVX2")
    module = native_loader.load(None if request.param == "native" else "avx2")
    if module is None:
        pytest.skip(f"the {request.param} build could not be made (no compiler?); see the log")
    return module


@pytest.mark.parametrize("name", PANELED)
@pytest.mark.parametrize("m", [1, 3, 8, 13])
def test_imatmul_matches_llama_numerics(kernel, name, m):
    need_kernel(kernel, name)
    x, w = activations(m, K, seed_of(name, 20 + m)), weights(name, N, K, seed_of(name, 40 + m))
    y = imatmul(kernel, x, kernel.interleave(w, int(T[name])), N, name)
    assert y.shape == (m, N)
    check_same_numerics(y, x, w, name)


@pytest.mark.parametrize("name", PANELED)
def test_avx2_and_avx512_kernels_give_the_same_bits(native, name):
    """The two widths compute the same exact integer sums and then the same float operations
    per row, so their outputs are equal bit for bit (every token tile, a partial panel)."""
    avx2 = native_loader.load("avx2") if native_loader.cpu_isa() == "avx512vnni" else None
    if avx2 is None:
        pytest.skip("needs an AVX-512 VNNI CPU (to run both builds) and a compiler")
    need_kernel(native, name)
    qt = int(T[name])
    x, w = activations(13, K, seed_of(name, 80)), weights(name, N, K, seed_of(name, 81))
    panels = native.interleave(w, qt)
    for m in (1, 3, 13):
        assert torch.equal(
            imatmul(native, x[:m], panels, N, name), imatmul(avx2, x[:m], panels, N, name)
        ), m


@pytest.mark.parametrize("k", [2880, 64])  # gpt-oss's width; two blocks
@pytest.mark.parametrize("m", [1, 3, 17])
def test_mxfp4_panels_match_the_moe_kernel_and_dequantize(kernel, k, m):
    """MXFP4 (gpt-oss's experts) in panels: llama.cpp's numerics (the oracle), the same terms
    as moe.cpp's row-at-a-time kernel on the same rows as one expert (other float summation
    order), and x̂ · dequantize(W)ᵀ up to float rounding (x̂: the quantized activations)."""
    need_kernel(kernel, "MXFP4")
    qt, n = int(T.MXFP4), 45  # 45 rows: two full panels and one of 13
    x, w = activations(m, k, seed_of("MXFP4", k + m)), weights("MXFP4", n, k, 7 * k + m)
    y = imatmul(kernel, x, kernel.interleave(w, qt), n, "MXFP4")
    check_same_numerics(y, x, w, "MXFP4")

    # moe.cpp splits each block's term over 8 lanes of 4 products: its rounding scales with
    # Σ |x̂_j · w_j| (x̂: the values the int8 activations stand for), not with Σ |terms|.
    xq, wf = ref.dequantized_activations(x, qt), dequantize(w, qt).double()
    products = xq.abs() @ wf.abs().T
    rows = torch.arange(m)
    moe = kernel.moe_matmul_many(x, [w[None]], qt, rows, torch.zeros(m, dtype=torch.int64))[0]
    assert ((y - moe).abs().double() <= 1e-5 * products + 1e-30).all()
    assert ((y.double() - xq @ wf.T).abs() <= 1e-5 * products + 1e-30).all()


# ---------------------------------------------------------------- 3. batch invariance


@pytest.mark.parametrize("name", PANELED)
def test_imatmul_is_batch_invariant(kernel, name):
    """Row t of a 13-token call is bit-identical to token t alone, and to it inside calls of
    1..13 tokens (so every token-tile width of the kernel, 1..8, and its partial tiles)."""
    need_kernel(kernel, name)
    m = 13
    x, w = activations(m, K, seed_of(name, 60)), weights(name, N, K, seed_of(name, 61))
    panels = kernel.interleave(w, int(T[name]))
    y = imatmul(kernel, x, panels, N, name)
    for t in range(m):
        assert torch.equal(imatmul(kernel, x[t : t + 1], panels, N, name)[0], y[t]), t
    for count in range(1, m):
        assert torch.equal(imatmul(kernel, x[:count], panels, N, name), y[:count]), count
    assert torch.equal(imatmul(kernel, x[5:12], panels, N, name), y[5:12])


# ---------------------------------------------------------------- 4. many weights, threads


@pytest.mark.parametrize("name", PANELED)
@pytest.mark.parametrize("m", [1, 13])
def test_imatmul_many_equals_separate_calls_and_any_thread_count(native, name, m):
    need_kernel(native, name)
    qt = int(T[name])
    ns = [37, 16, 600]  # 600: enough panels that 1 and 2 threads cut different chunks
    x = activations(m, K, seed_of(name, 80 + m))
    ws = [weights(name, n, K, seed_of(name, 90 + i)) for i, n in enumerate(ns)]
    panels = [native.interleave(w, qt) for w in ws]
    try:
        runs = {}
        for threads in (1, 2):
            native.set_num_threads(threads)
            runs[threads] = native.imatmul_many(x, panels, ns, qt)
        alone = [imatmul(native, x, p, n, name) for p, n in zip(panels, ns, strict=True)]
    finally:
        native.set_num_threads(0)
    for i, n in enumerate(ns):
        assert runs[1][i].shape == (m, n)
        assert torch.equal(runs[1][i], runs[2][i]), (i, "1 vs 2 threads")
        assert torch.equal(runs[2][i], alone[i]), (i, "fused vs alone")
    check_same_numerics(runs[2][0], x, ws[0], name)  # the fused results are the right ones


# ---------------------------------------------------------------- 5. errors


def test_imatmul_rejects_mismatched_panels_and_counts(native):
    need_kernel(native, "Q4_0")
    qt = int(T.Q4_0)
    w = weights("Q4_0", N, K, 5)
    panels = native.interleave(w, qt)
    with pytest.raises(RuntimeError):  # panels of K = 512 rows, x of K = 1024
        native.imatmul_many(activations(2, 2 * K, 5), [panels], [N], qt)
    with pytest.raises(RuntimeError):  # panels cut from wider rows than x has
        native.imatmul_many(activations(2, K, 5), [panels[:, :-288]], [N], qt)
    x = activations(2, K, 6)
    with pytest.raises(RuntimeError):  # two panel tensors, one row count
        native.imatmul_many(x, [panels, panels], [N], qt)
    with pytest.raises(RuntimeError):  # one panel tensor, two row counts
        native.imatmul_many(x, [panels], [N, N], qt)
    with pytest.raises(RuntimeError):  # more rows than 3 panels hold
        native.imatmul_many(x, [panels], [3 * R + 1], qt)
    with pytest.raises(RuntimeError):  # panels of another type's layout
        native.imatmul_many(x, [panels], [N], int(T.Q8_0))


def test_deinterleave_rejects_rows_out_of_range(build):
    qt = int(T.Q4_0)
    panels = build.interleave(weights("Q4_0", N, K, 8), qt)
    rows = panels.shape[0] * R
    for bad in (N, rows - 1, rows, rows + 100, -1):  # N..rows-1: the last panel's padding
        with pytest.raises(RuntimeError, match="out of range"):
            build.deinterleave(panels, torch.tensor([0, bad]), qt, K, N)
    with pytest.raises(RuntimeError):  # K that does not match the panels' width
        build.deinterleave(panels, torch.tensor([0]), qt, 2 * K, N)
    with pytest.raises(RuntimeError, match="do not hold"):  # more rows than the panels have
        build.deinterleave(panels, torch.tensor([0]), qt, K, rows + 1)


@pytest.mark.parametrize("name", ["Q5_1", "Q2_K", "IQ4_NL"])
def test_types_without_a_layout_are_refused(build, name):
    fmt = block_format(T[name])
    w = torch.zeros(N, fmt.row_bytes(K), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="Q4_0"):
        build.interleave(w, int(T[name]))
    with pytest.raises(RuntimeError):
        build.panel_bytes(int(T[name]), K)
    assert not build.interleaved_supports(int(T[name]))
    assert interleave(w, int(T[name])) is None  # kernels.linear keeps the GGML rows instead


def test_builds_without_panel_kernels_refuse_imatmul():
    scalar = native_loader.load("scalar")
    if scalar is None:
        pytest.skip("the scalar build could not be made (no compiler?)")
    qt = int(T.Q4_0)
    assert not scalar.interleaved_supports(qt)
    panels = scalar.interleave(weights("Q4_0", N, K, 9), qt)
    with pytest.raises(RuntimeError, match="no panel kernel"):
        scalar.imatmul_many(activations(1, K, 9), [panels], [N], qt)


# ---------------------------------------------------------------- 6. PackedLinear


@pytest.mark.parametrize("name", PANELED)
def test_packed_linear_over_panels(native, name):
    need_kernel(native, name)
    qt = int(T[name])
    x, w = activations(5, K, seed_of(name, 100)), weights(name, N, K, seed_of(name, 101))
    made = interleave(w, qt)
    assert made is not None and torch.equal(made, native.interleave(w, qt))
    paneled = PackedLinear(w, qt, K, panels=made)
    plain = PackedLinear(w, qt, K)
    assert paneled.panels is made and plain.panels is None

    y = paneled(x)
    assert torch.equal(y, imatmul(native, x, made, N, name))
    check_same_numerics(y, x, w, name)
    if native.supports(qt):  # (MXFP4 rows have no qmatmul kernel: plain dequantizes)
        check_same_numerics(plain(x), x, w, name)  # the GGML-row kernel: same terms, other order

    bias = torch.randn(N, generator=torch.Generator().manual_seed(1))
    assert torch.equal(PackedLinear(w, qt, K, bias=bias, panels=made)(x), y + bias)

    ids = torch.tensor([36, 0, 17, 17, 5, 31])
    assert torch.equal(paneled.rows(ids), dequantize(w[ids], qt))
    ids2 = ids.reshape(2, 3)
    got = paneled.rows(ids2)
    assert got.shape == (2, 3, K)
    assert torch.equal(got, dequantize(w[ids], qt).reshape(2, 3, K))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "MXFP4"])  # MXFP4: no GGML-row kernel
def test_matmuls_fuses_paneled_linears(native, name, monkeypatch):
    need_kernel(native, name)
    qt = int(T[name])
    x = activations(6, K, seed_of(name, 110))
    wa, wb = weights(name, N, K, seed_of(name, 111)), weights(name, 50, K, seed_of(name, 112))
    a = PackedLinear(wa, qt, K, panels=interleave(wa, qt))
    b = PackedLinear(wb, qt, K, panels=interleave(wb, qt))
    plain_b = PackedLinear(wb, qt, K)
    separate = [a(x), b(x), plain_b(x)]

    calls = []
    original = native.imatmul_many

    def counting(x, panels, ns, ggml_type):
        calls.append(len(panels))
        return original(x, panels, ns, ggml_type)

    monkeypatch.setattr(native, "imatmul_many", counting)
    assert linear_mod.native_loader.load() is native
    fused = matmuls([a, b], x)
    assert calls == [2], "two paneled linears of one type: one imatmul_many call"
    assert torch.equal(fused[0], separate[0]) and torch.equal(fused[1], separate[1])

    calls.clear()
    mixed = matmuls([a, plain_b], x)  # paneled and plain: each on its own path
    assert calls == [1]
    assert torch.equal(mixed[0], separate[0]) and torch.equal(mixed[1], separate[2])
    mixed = matmuls([plain_b, a], x)
    assert torch.equal(mixed[0], separate[2]) and torch.equal(mixed[1], separate[0])


# ---------------------------------------------------------------- 7. GGUFFile


def write_q4_0_gguf(path, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    import gguf

    small = torch.arange(10, dtype=torch.float32)  # so the big tensor starts mid-page
    big = quantize(torch.randn(rows, k, generator=torch.Generator().manual_seed(4)), T.Q4_0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("small", small.numpy())
    writer.add_tensor("big", big.numpy(), raw_dtype=T.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return small, big


def test_gguf_file_derived_and_release_pages(tmp_path):
    import mmap

    from loaders.gguf_file import GGUFFile
    from quant.errors import GGUFError

    path = tmp_path / "q4.gguf"
    small, big = write_q4_0_gguf(path, 256, 2048)  # 256 × 1152 bytes: 72 pages of 4 KiB
    with GGUFFile(path) as f:
        info = f.info("big")
        assert info.ggml_type == int(T.Q4_0) and info.nbytes == big.numel()
        assert info.nbytes > 4 * mmap.PAGESIZE
        view = f.tensor("big")
        assert torch.equal(view, big)

        made = []

        def make():
            made.append(1)
            return view.clone()

        first = f.derived(("copy", "big"), make)
        assert f.derived(("copy", "big"), make) is first and len(made) == 1
        other = f.derived(("copy", "small"), make)
        assert other is not first and len(made) == 2

        before = view.clone()
        f.release_pages("big")
        assert torch.equal(view, before)  # the same view reads the file again, unchanged
        assert torch.equal(f.tensor("big"), big)
        assert torch.equal(f.tensor("small").view(torch.float32).reshape(-1), small)
        with pytest.raises(GGUFError):
            f.release_pages("missing")
    f.release_pages("big")  # closed: nothing to release, no error
    assert torch.equal(view, big)  # live views outlast close()


# ---------------------------------------------------------------- 8. the real model


def test_models_on_one_file_share_their_panels(smollm2_path, native):
    from loaders.config import ModelConfig
    from loaders.gguf_file import GGUFFile
    from runtime.models import build_model

    gguf_file = GGUFFile(smollm2_path)
    config = ModelConfig.from_metadata(gguf_file.metadata, gguf_file.tensors.keys())
    first, second = build_model(gguf_file, config), build_model(gguf_file, config)
    assert config.tied_head and first.head is first.embed

    names = ("q", "k", "v", "o", "gate", "up", "down")
    for model in (first, second):
        linears = [getattr(b, n) for b in model.layers for n in names] + [model.embed]
        for lin in linears:
            assert type(lin) is PackedLinear
            if native.interleaved_supports(int(lin.ggml_type)):
                assert lin.panels is not None
            else:
                assert lin.panels is None
    if not native.interleaved_supports(int(first.layers[0].q.ggml_type)):
        return  # no panel kernels in this build: nothing is shared but the mapping

    for a, b in (
        (first.layers[0].q, second.layers[0].q),
        (first.layers[-1].down, second.layers[-1].down),
        (first.embed, second.embed),
    ):
        assert a.panels.data_ptr() == b.panels.data_ptr()
    # The panels hold the file's rows (read again from the file after release_pages).
    for name, lin in (
        ("blk.0.attn_q.weight", first.layers[0].q),
        ("token_embd.weight", first.embed),
    ):
        packed = gguf_file.tensor(name)
        ids = torch.tensor([0, 1, 15, 16, packed.shape[0] - 1])
        assert torch.equal(
            native.deinterleave(
                lin.panels, ids, int(lin.ggml_type), lin.in_features, lin.out_features
            ),
            packed[ids],
        )
    q = first.layers[0].q
    x = activations(2, q.in_features, 3)
    assert torch.equal(q(x), second.layers[0].q(x))


def test_panels_go_with_the_last_model_on_their_file(smollm2_path, native):
    """Panels live in GGUFFile.derived: unloading every model on the file (LoadedModel's
    cache of open files is weak) frees them, and the huge-page slabs they were carved from."""
    import gc
    import weakref

    from runtime.loaded_model import LoadedModel

    if not native.interleaved_supports(int(T.Q4_1)):
        pytest.skip("no panel kernels in this build")
    first, second = LoadedModel.load(str(smollm2_path)), LoadedModel.load(str(smollm2_path))
    panels = weakref.ref(first.model.layers[0].q.panels)
    assert second.model.layers[0].q.panels is panels()
    del first
    gc.collect()
    assert panels() is not None  # the second model still holds its file and the panels
    del second
    gc.collect()
    assert panels() is None
