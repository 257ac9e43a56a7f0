"""kernels/native: the native quantized matmul has llama.cpp's CPU numerics.

Oracle: kernels/act_quant_ref.py, a plain torch version of the same arithmetic (activations
quantized to Q8_0/Q8_1/Q8_K, exact integer dot products per block, float scales).

Tolerances:
- against the oracle, |y - ref| ≤ 1e-5 · Σ_b |term_b| per output. Both compute the same
  per-block terms (integer sums, the same float32 scale products); only the float32
  accumulation order differs (the kernel sums blocks per 8-lane vector, the oracle in
  float64), whose error is ≤ (n_blocks + 8) · 2^-24 · Σ|terms| ≈ 5e-6 · Σ|terms| for the
  ≤ 64 blocks per row here (observed ≈ 2e-7);
- against the fp32 path (dequantize, then x @ Wᵀ), the error is what quantizing x explains:
  |y − y32| ≤ Σ_j |w_j| · |x_j − x̂_j| (x̂ = d·q, the values the int8 activations stand for;
  Q8_1 adds Σ_b |m_b| · |s_b − d_b Σq_b| for its separately rounded block sums) plus float32
  slop 1e-4 · Σ|w||x|; in norm, ‖y − y32‖ / ‖y32‖ ≤ 2e-2 (observed 0.4–1%, as llama.cpp's
  own outputs are from fp32).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from kernels import act_quant_ref as ref
from kernels import native_loader
from quant.dequant import dequantize
from quant.formats import block_format
from quant.quantize import quantize

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
TYPES += ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"]
QUANTIZABLE = ("Q4_0", "Q4_1", "Q8_0")  # quant.quantize makes these from random floats
HALF_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
}


@pytest.fixture
def kernel(isa_build):
    """The extension built for this CPU, the AVX2 one (when the CPU's best is another), and
    the portable scalar build (conftest's isa_build)."""
    return isa_build


def weights(name: str, n: int, k: int, seed: int) -> torch.Tensor:
    """(n, row_bytes) packed rows: quantized random floats, or random blocks whose fp16
    scales are finite (both signs, magnitudes over two decades)."""
    gen = torch.Generator().manual_seed(seed)
    if name in QUANTIZABLE:
        return quantize(torch.randn(n, k, generator=gen) * 0.05, T[name])
    fmt = block_format(T[name])
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n * (k // fmt.block_size), fmt.type_size), dtype=np.uint8)
    for at in HALF_FIELDS[name]:
        scale = rng.choice([-1, 1], len(blocks)) * 10.0 ** rng.uniform(-4, -2, len(blocks))
        blocks[:, at : at + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1))


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, :32] *= 20  # an outlier block, as real hidden states have
    return x


def check_same_numerics(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, name: str) -> None:
    want, magnitude = ref.reference(x, w, int(T[name]))
    err = (y.double() - want).abs()
    worst = (err / magnitude.clamp_min(1e-30)).max().item()
    assert (err <= 1e-5 * magnitude + 1e-30).all(), f"{name}: error/Σ|terms| up to {worst:.2e}"


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_matches_llama_numerics(kernel, name, m):
    k, n = 512, 37
    seed = 10 * TYPES.index(name) + m
    x, w = activations(m, k, seed), weights(name, n, k, seed)
    y = kernel.qmatmul(x, w, int(T[name]))
    assert y.shape == (m, n) and y.dtype == torch.float32
    check_same_numerics(y, x, w, name)


@pytest.mark.parametrize("name", TYPES)
def test_batch_invariant(kernel, name):
    """A token's output row is bit-identical whatever other tokens share the call (so the
    engine's batched steps give exactly what each sequence gives alone)."""
    k, n, m = 1024, 29, 11  # 11 tokens: tiles of 4, 4 and a 3; 1024 = 32 blocks of 32
    x, w = activations(m, k, 70), weights(name, n, k, 71)
    y = kernel.qmatmul(x, w, int(T[name]))
    for t in range(m):
        assert torch.equal(kernel.qmatmul(x[t : t + 1], w, int(T[name]))[0], y[t]), t
    assert torch.equal(kernel.qmatmul(x[5:10], w, int(T[name])), y[5:10])


@pytest.mark.parametrize("name", TYPES)
def test_close_to_fp32_within_activation_quantization(kernel, name):
    k, n, m = 1024, 45, 5
    seed = 500 + TYPES.index(name)
    x, w = activations(m, k, seed), weights(name, n, k, seed)
    qt = int(T[name])
    y = kernel.qmatmul(x, w, qt).double()
    wf = dequantize(w, qt).double()  # (n, k)
    y32 = (x @ dequantize(w, qt).T).double()
    xhat = ref.dequantized_activations(x, qt)
    bound = (x.double() - xhat).abs() @ wf.abs().T + 1e-4 * (x.double().abs() @ wf.abs().T)
    if ref.VEC_DOT[T(qt)] == "Q8_1":  # m_w · s with s = fp16(d · Σq) rounded on its own
        a = ref.quantize_acts(x, qt)
        s_err = (a.s.double() - a.d.double() * a.q.sum(-1).double()).abs()  # (m, nb)
        mins = w.reshape(n, k // 32, -1)[..., 2:4].contiguous().view(torch.float16)
        bound += s_err @ mins.squeeze(-1).double().abs().T
    assert ((y - y32).abs() <= bound).all()
    rel = ((y - y32).norm() / y32.norm()).item()
    assert rel < 2e-2, f"{name}: relative error {rel:.2e} from the fp32 path"


@pytest.mark.parametrize("name", TYPES)
def test_larger_shape_threads_and_strided_weights(kernel, name):
    """Many row chunks (split across threads): the same bits for 1 and 2 threads, and for a
    row-strided view of the weights."""
    k, n, m = 2048, 300, 9
    seed = 900 + TYPES.index(name)
    x, w = activations(m, k, seed), weights(name, n, k, seed)
    qt = int(T[name])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.qmatmul(x, w, qt)
        torch.set_num_threads(2)
        two = kernel.qmatmul(x, w, qt)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    wide = torch.zeros(n, w.shape[1] + 64, dtype=torch.uint8)
    wide[:, 16 : 16 + w.shape[1]] = w
    assert torch.equal(kernel.qmatmul(x, wide[:, 16 : 16 + w.shape[1]], qt), one)
    assert torch.equal(kernel.qmatmul(x.T.contiguous().T, w, qt), one)  # non-contiguous x
    check_same_numerics(one[:2], x[:2], w, name)


ACT_KINDS = ["Q8_0", "Q8_1", "Q8_K"]
TYPE_OF_KIND = {"Q8_0": T.Q4_0, "Q8_1": T.Q4_1, "Q8_K": T.Q4_K}


@pytest.mark.parametrize("kind", ACT_KINDS)
def test_activation_quantization_bit_exact(kernel, kind):
    """q, d, s and bsums equal the reference exactly, ties and degenerate blocks included."""
    x = activations(6, 1024, 77 + ACT_KINDS.index(kind))
    x[1] = 0  # all-zero blocks: d = 0, q = 0
    # amax 127 makes id = 1 (Q8_0/Q8_1) and iscale = -1 (Q8_K): halves are exact ties,
    # rounded to even
    x[2] = torch.arange(1024) % 64 - 31.5
    x[2, ::32] = 127
    x[3, :512] = 0.5 * (torch.arange(512) % 7 - 3)
    x[3, 0], x[3, 1] = 3.0, -3.0  # |x| ties for the Q8_K max: the first one sets the sign
    x[4, 256:512] = -1e-3  # a constant negative block
    x[5, 512:] = 1e30  # huge values (fp16 d overflows to inf, as in ggml)
    x[0] *= torch.logspace(-9, 6, 4).repeat_interleave(256)  # d from fp16 subnormals to large
    got = kernel.quantize_activations(x, ref.ACT_KIND[kind])
    want = ref.quantize_acts(x, int(TYPE_OF_KIND[kind]))
    assert torch.equal(got[0].view(6, -1, want.q.shape[-1]).long(), want.q)
    assert torch.equal(got[1], want.d)
    if kind == "Q8_1":
        assert torch.equal(got[2], want.s)
    if kind == "Q8_K":
        assert torch.equal(got[3].view(6, -1, 16).long(), want.bsums)


def test_concurrent_callers(kernel):
    """Calls from several Python threads at once (the GIL is released) give the results of
    calls one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        (activations(m, 512, i), weights(name, 64, 512, i), int(T[name]))
        for i, (name, m) in enumerate([("Q4_0", 1), ("Q4_K", 3), ("Q8_0", 1), ("Q6_K", 5)] * 3)
    ]
    want = [kernel.qmatmul(*job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda job: kernel.qmatmul(*job), jobs))
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_errors_and_support(kernel):
    x = torch.randn(2, 64)
    w = weights("Q4_0", 4, 64, 0)
    with pytest.raises(RuntimeError, match="row"):
        kernel.qmatmul(x, w[:, :-2], int(T.Q4_0))
    with pytest.raises(RuntimeError, match="unsupported"):
        kernel.qmatmul(x, w, int(T.F16))
    with pytest.raises(RuntimeError, match="float32"):
        kernel.qmatmul(x.double(), w, int(T.Q4_0))
    assert kernel.qmatmul(x[:0], w, int(T.Q4_0)).shape == (0, 4)
    assert all(kernel.supports(int(T[name])) for name in TYPES)
    assert not kernel.supports(int(T.F32)) and not kernel.supports(int(T.IQ2_XXS))


def test_loader_api_and_disable(kernel, monkeypatch):
    if native_loader.load() is None:
        pytest.skip("no native build for this CPU")
    x, w = activations(2, 256, 3), weights("Q4_K", 5, 256, 3)
    assert native_loader.available() and native_loader.supports(int(T.Q4_K))
    assert torch.equal(
        native_loader.qmatmul(x, w, int(T.Q4_K)), native_loader.load().qmatmul(x, w, int(T.Q4_K))
    )
    monkeypatch.setenv("TANDEM_NATIVE", "0")
    assert not native_loader.available() and not native_loader.supports(int(T.Q4_K))
    with pytest.raises(RuntimeError, match="unavailable"):
        native_loader.qmatmul(x, w, int(T.Q4_K))


def test_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch, caplog):
    bad = tmp_path / "qmatmul.cpp"
    bad.write_text("#error this toolchain cannot build tandem's kernel\n")
    monkeypatch.setattr(native_loader, "SOURCES", (bad,))
    monkeypatch.setattr(native_loader, "_modules", {})
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    with caplog.at_level(logging.WARNING, logger=native_loader.__name__):
        assert native_loader.load("scalar") is None
        assert native_loader.load("scalar") is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()


def test_thread_count_is_settable_and_results_do_not_depend_on_it(kernel):
    x, w = activations(5, 512, 90), weights("Q4_0", 300, 512, 91)
    kernel.set_num_threads(0)  # 0 = follow torch (a forward leaves its own count set)
    torch_threads = torch.get_num_threads()
    assert kernel.get_num_threads() == torch_threads
    one = kernel.qmatmul(x, w, int(T.Q4_0))
    kernel.set_num_threads(3)
    try:
        assert kernel.get_num_threads() == 3
        assert torch.equal(kernel.qmatmul(x, w, int(T.Q4_0)), one)
    finally:
        kernel.set_num_threads(0)
    assert kernel.get_num_threads() == torch_threads
    with pytest.raises(RuntimeError):
        kernel.set_num_threads(-1)


def test_forward_threads_gives_matmuls_the_threads_and_torch_one(kernel):
    """Inside and after a forward: the native pool has the threads, torch's ops one (the
    sampler between forwards too: kernels/thread_policy.py)."""
    from kernels.thread_policy import default_threads, forward_threads

    module = native_loader.load()
    with forward_threads(2):
        assert torch.get_num_threads() == 1
        assert module.get_num_threads() == 2
    assert torch.get_num_threads() == 1 and module.get_num_threads() == 2
    with forward_threads():
        assert module.get_num_threads() == default_threads()


@pytest.mark.parametrize("name", TYPES)
def test_many_weights_in_one_call_equal_separate_calls(kernel, name):
    k = 512
    x = activations(6, k, 80)
    ws = [weights(name, n, k, 81 + i) for i, n in enumerate((40, 7, 23))]
    ws.insert(2, torch.empty(0, ws[0].shape[1], dtype=torch.uint8))  # an empty matrix too
    ys = kernel.qmatmul_many(x, ws, int(T[name]))
    assert [tuple(y.shape) for y in ys] == [(6, 40), (6, 7), (6, 0), (6, 23)]
    for y, w in zip(ys, ws, strict=True):
        assert torch.equal(y, kernel.qmatmul(x, w, int(T[name])))
    with pytest.raises(RuntimeError):
        kernel.qmatmul_many(x, [ws[0], weights(name, 4, 2 * k, 1)], int(T[name]))


def test_linear_matmuls_fuse_only_what_matches():
    from kernels.linear import PackedLinear, matmuls

    k = 256
    x = activations(3, k, 5)
    lins = [PackedLinear(weights("Q8_0", n, k, 60 + n), int(T.Q8_0), k) for n in (16, 8)]
    lins.append(
        PackedLinear(
            weights("Q4_0", 8, k, 70), int(T.Q4_0), k, bias=torch.arange(8, dtype=torch.float32)
        )
    )
    for group in (lins[:2], lins):  # one type: fused; mixed types: separate calls
        for y, lin in zip(matmuls(group, x), group, strict=True):
            assert torch.equal(y, lin(x))


def test_native_isa_override(monkeypatch, caplog):
    """TANDEM_NATIVE_ISA picks a lower build; an unknown name or one above the CPU's best is
    refused with a warning and the best is used (a higher build could crash with SIGILL)."""
    best = native_loader.cpu_isa()
    monkeypatch.delenv("TANDEM_NATIVE_ISA", raising=False)
    assert native_loader.chosen_isa() == best
    monkeypatch.setenv("TANDEM_NATIVE_ISA", "scalar")
    assert native_loader.chosen_isa() == "scalar"
    with caplog.at_level(logging.WARNING, logger="kernels.native_loader"):
        monkeypatch.setenv("TANDEM_NATIVE_ISA", "neon9000")
        assert native_loader.chosen_isa() == best
        assert "not one of" in caplog.text
        if best != "avx512vnni":
            monkeypatch.setenv("TANDEM_NATIVE_ISA", "avx512vnni")
            assert native_loader.chosen_isa() == best
            assert "runs at most" in caplog.text


def test_every_kernel_source_is_package_data():
    """A non-editable install (`pip install .`, the README's first command) ships only the
    package data: every file the native build reads must match its patterns (a missing
    header once left such installs on the torch path)."""
    import fnmatch
    from pathlib import Path

    import tomllib

    root = Path(native_loader.__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["kernels"]
    for src in native_loader.SOURCES + native_loader.HEADERS:
        rel = src.relative_to(root / "kernels").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"
    on_disk = {
        p.name for p in (root / "kernels" / "native").iterdir() if p.suffix in (".cpp", ".h")
    }
    assert on_disk == {p.name for p in native_loader.SOURCES + native_loader.HEADERS}
