"""tandem against llama.cpp's recorded logits on synthetic models of every architecture
(scripts/conformance.py --record wrote tests/data/conformance/), and llama-perplexity's
KL-divergence base format (loaders/kl_base.py) against a file llama.cpp wrote.

Each architecture's model is regenerated here (scripts/make_synthetic_gguf.py --arch,
seeded, cached by a hash of the generator: generator_key; its sha256 must equal the one
llama.cpp ran on) and evaluated by
runtime.perplexity.kl_divergence against the recorded base. Goal (issue 14): mean KL ≤ 2×
llama.cpp's own floor (the larger KL between llama.cpp settings: -fa on vs off, 1 vs 2
threads) and top-1 agreement ≥ 99% (or, where llama.cpp's own settings agree less than
that, ≥ its own agreement less two standard errors: top1_bound). Where the floor is exactly 0 (llama.cpp bit-identical
across settings), the bound is ABS_KL = 1e-4 nats: the 16-bit packing of the base alone
contributes up to ~1e-8, and f16 KV-cache rounding in two runtimes that round at different
points gives ~1e-6 on these models, so 1e-4 still flags a wrong layer (those give > 1e-2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, REPO, load_script

from loaders.config import ENCODERS
from loaders.kl_base import KLBase, pack_rows, row_width
from runtime.models import ARCHITECTURES as RUNTIME_ARCHITECTURES
from runtime.perplexity import KLDivergence, chunk_targets, kl_divergence

DATA = REPO / "tests" / "data" / "conformance"
RECORDED = sorted(p.stem for p in DATA.glob("*.json"))
RAW = DATA / "llama-c8.raw.kl"  # llama-perplexity -c 8 --chunks 1 on the llama model
LLAMA_BIN = Path.home() / ".cache" / "tandem-ref" / "bin"


@pytest.fixture(scope="module")
def scripts():
    load_script("conformance_fixture")
    return load_script("make_synthetic_gguf"), load_script("conformance")


def generator_key(tokenizer: Path) -> str:
    """A hash of everything a synthetic model's bytes depend on: the generator, its
    architecture table, the quantizers, the fixture settings, the tokenizer file and the
    torch / numpy / gguf versions (the random streams and gguf-py's writer)."""
    from importlib.metadata import version

    import torch

    h = hashlib.sha256()
    sources = [
        REPO / "scripts" / "make_synthetic_gguf.py",
        REPO / "scripts" / "conformance_fixture.py",
    ]
    sources += sorted((REPO / "scripts" / "synthetic_archs").glob("*.py"))
    sources += sorted((REPO / "quant").glob("*.py"))
    for path in sources:
        h.update(path.name.encode() + path.read_bytes())
    versions = (torch.__version__, np.__version__, version("gguf"))
    h.update(f"{tokenizer.name} {tokenizer.stat().st_size} {versions}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def synthetic(scripts, smollm2_path):
    """arch → the regenerated synthetic GGUF, cached under $TANDEM_HOME/test-cache by
    generator_key (regenerating all of them takes minutes on 2 cores; a change to the
    generator, the table or the quantizers changes the key, so the sha256 check below still
    sees what the current generator writes)."""
    make, _ = scripts
    fixture = load_script("conformance_fixture")
    key = generator_key(smollm2_path)
    folder = Path(os.environ["TANDEM_HOME"]) / "test-cache" / "conformance"
    folder.mkdir(parents=True, exist_ok=True)

    def get(arch: str) -> Path:
        path = folder / f"{arch}-{key}.gguf"
        if not path.is_file():
            entry = make.ARCHITECTURES[arch]
            qtype = make.TYPES[fixture.WEIGHT_TYPE]
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            make.make_arch(tmp, entry, qtype, smollm2_path, entry.dims, fixture.SEED)
            tmp.replace(path)  # atomic: a concurrent run never reads a partial file
        return path

    return get


def load_lm(path: Path):
    from runtime.loaded_model import LoadedModel
    from runtime.run_options import RunOptions

    return LoadedModel.load(path, options=RunOptions.resolve(flags={"num_thread": 2}))


def test_every_supported_architecture_is_recorded():
    # encoders (bert) make embeddings, not next-token logits: llama-perplexity has nothing to
    # compare; tests/test_bert_embeddings.py holds them to their reference vectors instead
    decoders = {a for a in RUNTIME_ARCHITECTURES if a not in ENCODERS}
    missing = sorted(decoders - set(RECORDED))
    assert not missing, (
        f"no conformance fixture: scripts/conformance.py --arch A --record for {missing}"
    )


@pytest.mark.parametrize("arch", RECORDED)
def test_tandem_matches_recorded_llamacpp(arch, synthetic):
    fixture = load_script("conformance_fixture")
    record = json.loads((DATA / f"{arch}.json").read_text())
    gguf = synthetic(arch)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert digest == record["gguf_sha256"], "the regenerated model is not the one llama.cpp ran"
    assert record["llama_mean_top_p"] >= 0.3, "the synthetic model is not confident enough"
    s = kl_divergence(load_lm(gguf), fixture.load(DATA / f"{arch}.npz"))
    floor = record["floor_kld"]
    bound = 2 * floor if floor > 0 else load_script("conformance").ABS_KL
    print(f"{arch}: KL {s['kld'][0]:.3e} (bound {bound:.3e}) top-1 {s['same_top'][0]:.4f}")
    assert s["kld"][0] <= bound
    assert s["same_top"][0] >= top1_bound(record)


def top1_bound(record: dict) -> float:
    """99% (the issue's goal), except where llama.cpp does not reach it against itself: there
    llama.cpp's own top-1 agreement less two of its standard errors (on 124 positions a
    near-tie flips under any rounding change; llama.cpp's -fa on vs off flips 2 of them)."""
    worst = min(record["floors"].values(), key=lambda f: f["same_top"][0])["same_top"]
    return min(0.99, worst[0] - 2 * worst[1])


def test_reads_llamacpp_base_file(synthetic, smollm2_path):
    """The header, tokens and packed rows of a file llama-perplexity wrote."""
    base = KLBase.read(RAW)
    assert (base.n_ctx, base.n_vocab, base.n_chunk) == (8, 49152, 1)
    assert base.packed.shape == (1, 3, row_width(49152))
    lm = load_lm(synthetic("llama"))
    text = (FIXTURES / "apache-2.0.txt").read_text()
    ids = lm.tokenizer.encode(text, add_special=True, parse_special=False)
    assert base.tokens.tolist() == ids[:8]
    logp = base.log_probs(0).astype(np.float64)  # (3, V)
    probs = np.where(logp > -16, np.exp(logp), 0).sum(-1)  # entries at the clip: < 1e-6 each
    assert np.allclose(probs, 1.0, atol=2e-3), probs


def test_writer_packs_as_llamacpp(synthetic):
    """Packing the decoded rows again gives llama.cpp's bytes (±1 in the last 16-bit
    step, from float rounding), and the header and token bytes are identical."""
    base = KLBase.read(RAW)
    repacked = pack_rows(base.log_probs(0))
    diff = np.abs(repacked[:, 4:].astype(np.int64) - base.packed[0, :, 4:].astype(np.int64))
    assert diff.max() <= 1
    # min_log_prob: the clipped entries decode to it, so re-packing adds their ~0.5% mass
    got, want = repacked[:, :4].view(np.float32), base.packed[0, :, :4].view(np.float32)
    assert np.allclose(got, want, rtol=1e-6, atol=1e-2)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"tandem-kl-{os.getpid()}.kl"
    try:
        KLBase(base.n_ctx, base.n_vocab, base.tokens, base.packed).write(out)
        assert out.read_bytes() == RAW.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def test_compact_fixture_is_exact():
    """conformance_fixture's compact form gives the raw file's figures exactly."""
    fixture = load_script("conformance_fixture")
    base = KLBase.read(RAW)
    compact = Path(os.environ.get("TMPDIR", "/tmp")) / f"tandem-kl-{os.getpid()}.npz"
    try:
        fixture.save(base, compact)
        rebuilt = fixture.load(compact)
    finally:
        compact.unlink(missing_ok=True)
    logits = np.random.default_rng(0).standard_normal((3, base.n_vocab)).astype(np.float32) * 4
    logits[:, base.log_probs(0).argmax(-1)] += 30  # mostly agreeing with the base
    figures = []
    for b in (base, rebuilt):
        kld = KLDivergence()
        kld.add(logits, b.log_probs(0), chunk_targets(b, 0))
        figures.append(kld.summary())
    assert figures[0] == figures[1]


@pytest.mark.skipif(
    shutil.which("llama-perplexity", path=str(LLAMA_BIN)) is None,
    reason=f"llama.cpp's llama-perplexity is not built in {LLAMA_BIN}",
)
def test_llamacpp_reads_tandem_base_file(synthetic, tmp_path):
    """A base file tandem writes is one llama-perplexity --kl-divergence reads, and finds
    close to its own logits."""
    from runtime.perplexity import perplexity

    gguf = synthetic("llama")
    text = (FIXTURES / "apache-2.0.txt").read_text()
    perplexity(load_lm(gguf), text, 64, 4, save=tmp_path / "tandem.kl")
    env = dict(os.environ, LD_LIBRARY_PATH=str(LLAMA_BIN))
    cmd = [str(LLAMA_BIN / "llama-perplexity"), "-m", str(gguf), "-c", "64", "-b", "64"]
    cmd += ["--kl-divergence-base", str(tmp_path / "tandem.kl"), "--kl-divergence", "-t", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    figures = load_script("conformance").parse_kl(out.stdout + out.stderr)
    record = json.loads((DATA / "llama.json").read_text())  # llama.cpp's own floor there
    assert figures["same_top"][0] >= top1_bound(record)
    assert figures["kld"][0] <= 2 * record["floor_kld"]
