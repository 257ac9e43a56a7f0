"""ModelConfig.from_metadata against the real SmolLM2 (llama) and Gemma3 files, and its errors."""

from __future__ import annotations

import math

import pytest

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from quant.errors import GGUFError, TandemError, UnsupportedError


@pytest.fixture(scope="module")
def smollm2_file(smollm2_path):
    with GGUFFile(smollm2_path) as f:
        yield f


@pytest.fixture(scope="module")
def gemma3_file(gemma3_path):
    with GGUFFile(gemma3_path) as f:
        yield f


def config_of(f: GGUFFile) -> ModelConfig:
    return ModelConfig.from_metadata(f.metadata, f.tensors.keys())


def test_smollm2_config(smollm2_file):
    c = config_of(smollm2_file)
    assert c.arch == "llama"
    assert c.n_layer == 30
    assert c.n_embd == 576
    assert c.n_ff == 1536
    assert c.n_head == 9
    assert c.n_head_kv == 3
    assert c.head_dim == 64 and c.head_dim_v == 64
    assert c.kv_dim == 3 * 64
    assert c.n_ctx_train == 8192
    assert c.vocab_size == 49152
    assert c.rope_base == 100000.0
    assert c.rope_base_swa == c.rope_base
    assert c.rope_scale == 1.0
    assert c.rope_neox is False
    assert c.tied_head is True
    assert "output.weight" not in smollm2_file.tensors
    assert c.attn_bias is False
    assert c.sliding_window == 0
    assert c.swa_layers == (False,) * 30
    assert c.activation == "silu"
    assert c.qk_norm is False and c.post_norms is False
    assert c.embed_scale == 1.0
    assert c.attn_scale == pytest.approx(1 / 8)
    assert c.rms_eps == pytest.approx(1e-5)


def test_gemma3_config(gemma3_file):
    c = config_of(gemma3_file)
    assert c.arch == "gemma3"
    assert c.n_layer == 18
    assert c.n_embd == 640
    assert c.n_ff == 2048
    assert c.n_head == 4
    assert c.n_head_kv == 1
    assert c.head_dim == 256 and c.head_dim_v == 256
    assert c.n_ctx_train == 32768
    assert c.vocab_size == 262144
    assert c.sliding_window == 512
    assert len(c.swa_layers) == 18
    assert [i for i, swa in enumerate(c.swa_layers) if not swa] == [5, 11, 17]
    assert c.rope_base == 1e6
    assert c.rope_base_swa == 10000.0
    assert c.rope_neox is True
    assert c.embed_scale == pytest.approx(math.sqrt(640))
    assert c.activation == "gelu_tanh"
    assert c.qk_norm is True and c.post_norms is True
    assert c.tied_head is True
    assert c.attn_bias is False
    assert c.attn_scale == pytest.approx(1 / 16)
    assert c.rms_eps == pytest.approx(1e-6)


def test_config_is_frozen(smollm2_file):
    c = config_of(smollm2_file)
    with pytest.raises(AttributeError):
        c.n_layer = 1  # type: ignore[misc]


def test_output_weight_means_untied_head(smollm2_file):
    names = [*smollm2_file.tensors.keys(), "output.weight"]
    assert ModelConfig.from_metadata(smollm2_file.metadata, names).tied_head is False


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedError) as info:
        ModelConfig.from_metadata({"general.architecture": "t5"}, [])
    message = str(info.value)
    assert "t5" in message
    for arch in ("llama", "mistral", "qwen2", "gemma3", "bert"):
        assert arch in message


def test_missing_architecture_is_unsupported():
    with pytest.raises(UnsupportedError):
        ModelConfig.from_metadata({}, [])


@pytest.mark.parametrize(
    "key",
    [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.feed_forward_length",
    ],
)
def test_missing_required_key_names_it(smollm2_file, key):
    md = dict(smollm2_file.metadata)
    del md[key]
    with pytest.raises(GGUFError) as info:
        ModelConfig.from_metadata(md, smollm2_file.tensors.keys())
    assert key in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("llama.attention.head_count", 0),
        ("llama.attention.head_count_kv", 0),
        ("llama.block_count", -1),
        ("llama.embedding_length", "576"),
    ],
)
def test_nonsense_shape_is_a_typed_error(smollm2_file, key, value):
    """A hostile or broken file gives a TandemError naming the key, not a ZeroDivisionError."""
    md = {**smollm2_file.metadata, key: value}
    with pytest.raises(TandemError) as info:
        ModelConfig.from_metadata(md, smollm2_file.tensors.keys())
    assert key in str(info.value)
