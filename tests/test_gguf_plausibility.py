"""A model GGUF whose hyperparameters disagree with its tensor table, or whose metadata has
the wrong types, fails at load with one typed line naming the key or tensor — before
anything is built per layer (issue 13: `block_count = 2^31` grew to 13 GB; a string
`rms_eps` or `vocab_size`, wrong tensor shapes, output rows < vocab and a string LoRA alpha
gave tracebacks, the shapes only at the first forward)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from gguf_models import DROP, FF, HD, HKV, TOKENS, VT, E, write_model
from test_lora import write_adapter

from loaders.config import ModelConfig
from loaders.gguf_check import MAX_VOCAB, block_indices
from loaders.gguf_file import GGUFFile
from loaders.lora_adapter import LoraAdapter
from quant.errors import GGUFError, TandemError, UnsupportedError
from runtime.loaded_model import LoadedModel

V = len(TOKENS)
L = "llama."

# name → (metadata overrides, tensor overrides, error type, message pattern)
CASES = {
    "block-count-2^31": (
        {L + "block_count": (2**31, VT.UINT32)},
        {},
        GGUFError,
        r"'llama.block_count' is 2147483648 but the file has only 21 tensors",
    ),
    "block-count-u64-max": (
        {L + "block_count": (2**64 - 1, VT.UINT64)},
        {},
        GGUFError,
        r"'llama.block_count' is 18446744073709551615 but",
    ),
    "block-count-one-more": (
        {L + "block_count": (3, VT.UINT32)},
        {},
        GGUFError,
        r"'llama.block_count' is 3 but the file has no tensors for block 2 ",
    ),
    "block-count-one-less": (
        {L + "block_count": (1, VT.UINT32)},
        {},
        GGUFError,
        r"'llama.block_count' is 1 but the file has tensors for block 1 ",
    ),
    "block-gap": (
        {L + "block_count": (3, VT.UINT32)},
        {f"blk.1.{n}.weight": DROP for n in ("attn_norm", "attn_q", "attn_k", "attn_v")}
        | {
            f"blk.1.{n}.weight": DROP
            for n in ("attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
        }
        | {"blk.2.attn_norm.weight": (E,)},
        GGUFError,
        r"'llama.block_count' is 3 but the file has no tensors for block 1 \(blk.1.\*; it holds 2",
    ),
    "head-count-vs-q": (
        {L + "attention.head_count": (3, VT.UINT32)},
        {},
        GGUFError,
        r"tensor 'blk.0.attn_q.weight' has shape \[32, 32\] but \[32, 48\] was expected "
        r"from the metadata \(llama.embedding_length=32, llama.attention.head_count=3",
    ),
    "head-count-kv-vs-k": (
        {L + "attention.head_count_kv": (2, VT.UINT32)},
        {},
        GGUFError,
        r"tensor 'blk.0.attn_k.weight' has shape \[32, 16\] but \[32, 32\] was expected",
    ),
    "head-count-not-multiple": (
        {L + "attention.head_count_kv": (3, VT.UINT32)},
        {},
        GGUFError,
        r"'llama.attention.head_count' \(2\) is not a multiple of .*head_count_kv' \(3\)",
    ),
    "key-length-vs-q": (
        {L + "attention.key_length": (8, VT.UINT32), L + "attention.value_length": DROP},
        {},
        GGUFError,
        r"tensor 'blk.0.attn_q.weight' has shape \[32, 32\] but \[32, 16\] was expected",
    ),
    "embedding-rows-vs-vocab": (
        {},
        {"token_embd.weight": (V - 1, E)},
        GGUFError,
        r"tensor 'token_embd.weight' has shape \[32, 7\] but \[32, 8\] was expected .*"
        r"vocabulary size 8",
    ),
    "output-rows-below-vocab": (
        {},
        {"output.weight": (V - 2, E)},
        GGUFError,
        r"tensor 'output.weight' has shape \[32, 6\] but \[32, 8\] was expected",
    ),
    "output-rows-above-vocab": (
        {},
        {"output.weight": (V + 8, E)},
        GGUFError,
        r"tensor 'output.weight' has shape \[32, 16\] but \[32, 8\] was expected",
    ),
    "vocab-size-vs-tokens": (
        {L + "vocab_size": (10, VT.UINT32)},
        {},
        GGUFError,
        r"'llama.vocab_size' is 10 but tokenizer.ggml.tokens holds 8 tokens",
    ),
    "vocab-size-huge": (
        {L + "vocab_size": (2**40, VT.UINT64)},
        {},
        UnsupportedError,
        rf"vocabulary of 1099511627776 tokens exceeds tandem's limit of {MAX_VOCAB}",
    ),
    "ffn-down-wrong-shape": (
        {},
        {"blk.1.ffn_down.weight": (E, FF + 32)},
        GGUFError,
        r"tensor 'blk.1.ffn_down.weight' has shape \[96, 32\] but \[64, 32\] was expected "
        r"from the metadata \(llama.feed_forward_length=64",
    ),
    "feed-forward-length-vs-tensors": (
        {L + "feed_forward_length": (128, VT.UINT32)},
        {},
        GGUFError,
        r"tensor 'blk.0.ffn_gate.weight' has shape \[32, 64\] but \[32, 128\] was expected",
    ),
    "norm-wrong-length": (
        {},
        {"blk.0.attn_norm.weight": (E + 1,)},
        GGUFError,
        r"tensor 'blk.0.attn_norm.weight' has shape \[33\] but \[32\] was expected",
    ),
    "missing-tensor": (
        {},
        {"blk.1.ffn_up.weight": DROP},
        GGUFError,
        r"tensor 'blk.1.ffn_up.weight' is missing; a llama model with 2 blocks needs it",
    ),
    "missing-output-norm": (
        {},
        {"output_norm.weight": DROP},
        GGUFError,
        r"tensor 'output_norm.weight' is missing",
    ),
    "mixture-of-experts": (
        {},
        {"blk.0.ffn_gate_inp.weight": (4, E)},
        UnsupportedError,
        r"tensor 'blk.0.ffn_gate_inp.weight': mixture-of-experts layers are not supported",
    ),
    "rms-eps-string": (
        {L + "attention.layer_norm_rms_epsilon": ("1e-6", VT.STRING)},
        {},
        GGUFError,
        r"'llama.attention.layer_norm_rms_epsilon' must be a number, got '1e-6' \(a string\)",
    ),
    "rms-eps-nan": (
        {L + "attention.layer_norm_rms_epsilon": (float("nan"), VT.FLOAT32)},
        {},
        GGUFError,
        r"'llama.attention.layer_norm_rms_epsilon' must be a positive number, got nan",
    ),
    "rope-base-bool": (
        {L + "rope.freq_base": (True, VT.BOOL)},
        {},
        GGUFError,
        r"'llama.rope.freq_base' must be a number, got True \(a bool\)",
    ),
    "vocab-size-string": (
        {L + "vocab_size": ("8", VT.STRING)},
        {},
        GGUFError,
        r"'llama.vocab_size' must be a positive integer, got '8' \(a string\)",
    ),
    "block-count-float": (
        {L + "block_count": (2.0, VT.FLOAT32)},
        {},
        GGUFError,
        r"'llama.block_count' must be a positive integer, got 2.0 \(a float\)",
    ),
    "embedding-length-string-array": (
        {L + "embedding_length": (["32", "32"], VT.ARRAY)},
        {},
        GGUFError,
        r"'llama.embedding_length' must be a positive integer, got '32' \(a string\)",
    ),
    "head-count-kv-per-layer-differs": (
        {L + "attention.head_count_kv": ([1, 2], VT.ARRAY)},
        {},
        UnsupportedError,
        r"'llama.attention.head_count_kv' differs between layers",
    ),
    "rope-base-array": (
        {L + "rope.freq_base": ([10000.0, 500.0], VT.ARRAY)},
        {},
        UnsupportedError,
        r"'llama.rope.freq_base' differs between layers",
    ),
    "scaling-type-int": (
        {L + "rope.scaling.type": (1, VT.UINT32)},
        {},
        GGUFError,
        r"'llama.rope.scaling.type' must be a string, got 1 \(an integer\)",
    ),
    "tokens-not-an-array": (
        {"tokenizer.ggml.tokens": ("abc", VT.STRING)},
        {},
        GGUFError,
        r"'tokenizer.ggml.tokens' must be an array, got 'abc' \(a string\)",
    ),
    "architecture-array": (
        {"general.architecture": (["llama"], VT.ARRAY)},
        {},
        UnsupportedError,
        r"unsupported architecture .*'llama'.* \(an array of 1\)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_implausible_model_fails_at_load_with_one_line(case: str, tmp_path: Path) -> None:
    md, shapes, error, pattern = CASES[case]
    path = write_model(tmp_path / f"{case}.gguf", md, shapes)
    start = time.perf_counter()
    with pytest.raises(TandemError) as info:
        LoadedModel.load(path)
    assert time.perf_counter() - start < 2.0
    assert type(info.value) is error, info.value
    message = str(info.value)
    assert "\n" not in message and re.search(pattern, message), message


def test_plausible_models_load_and_run(tmp_path: Path) -> None:
    """The checks' control: the unmodified tiny models (and a per-layer array that agrees)
    load, and a shape check can tell the llama family from gemma3's extra norms."""
    for arch in ("llama", "gemma3"):
        lm = LoadedModel.load(write_model(tmp_path / f"{arch}.gguf", arch=arch))
        assert lm.config.n_layer == 2 and lm.config.vocab_size == V
    same = {L + "attention.head_count_kv": ([HKV, HKV], VT.ARRAY)}
    assert LoadedModel.load(write_model(tmp_path / "per-layer.gguf", same)).config.n_head_kv == 1
    no_qnorm = {f"blk.{i}.attn_q_norm.weight": DROP for i in range(2)}
    path = write_model(tmp_path / "g.gguf", shapes=no_qnorm, arch="gemma3")
    with pytest.raises(GGUFError, match="tensor 'blk.0.attn_q_norm.weight' is missing"):
        LoadedModel.load(path)
    bad_qnorm = write_model(tmp_path / "g2.gguf", shapes={"blk.1.attn_k_norm.weight": (E,)})
    assert LoadedModel.load(bad_qnorm)  # llama ignores a tensor it does not read
    path = write_model(
        tmp_path / "g3.gguf", shapes={"blk.1.attn_k_norm.weight": (E,)}, arch="gemma3"
    )
    with pytest.raises(
        GGUFError, match=rf"'blk.1.attn_k_norm.weight' has shape \[{E}\] but \[{HD}\]"
    ):
        LoadedModel.load(path)


def test_block_count_is_checked_by_name_without_shapes() -> None:
    """Callers that pass names only (no TensorInfo) still get the block-count check, before
    anything per layer is built: 2^31 blocks fail at once."""
    md = {k: v for k, (v, _) in __import__("gguf_models").metadata().items()}
    names = list(__import__("gguf_models").tensors())
    md["llama.block_count"] = 2**31
    start = time.perf_counter()
    with pytest.raises(GGUFError, match="block_count' is 2147483648"):
        ModelConfig.from_metadata(md, names)
    assert time.perf_counter() - start < 0.1
    md["llama.block_count"] = 2
    assert ModelConfig.from_metadata(md, names).n_layer == 2
    assert block_indices(["blk.0.a", "blk.12.b", "blk.x.c", "blk.٣.d", "token_embd"]) == {0, 12}


def test_real_models_pass_the_shape_checks(smollm2_path: Path, gemma3_path: Path) -> None:
    for path, layers in ((smollm2_path, 30), (gemma3_path, 18)):
        with GGUFFile(path) as f:
            assert ModelConfig.from_metadata(f.metadata, f.tensors).n_layer == layers
            assert ModelConfig.from_metadata(f.metadata, f.tensors.keys()).n_layer == layers


# ------------------------------------------------------------------------ LoRA metadata


def _adapter(tmp_path: Path, alpha_kv: tuple | None) -> Path:
    g = np.random.default_rng(0)
    pairs = {"blk.0.attn_q.weight": (g.standard_normal((4, E)), g.standard_normal((E, 4)))}
    path = tmp_path / "adapter.gguf"
    write_adapter(path, pairs, alpha=None, dtype=np.float32)
    if alpha_kv is None:
        return path
    import gguf

    reader = gguf.GGUFReader(path)  # rewrite with the hostile alpha added
    writer = gguf.GGUFWriter(str(tmp_path / "hostile.gguf"), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_key_value("adapter.lora.alpha", *alpha_kv)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "hostile.gguf"


@pytest.mark.parametrize(
    "alpha_kv, pattern",
    [
        (("8", VT.STRING), r"'adapter.lora.alpha' must be a number \(float32\), got a string '8'"),
        ((True, VT.BOOL), r"'adapter.lora.alpha' must be a number \(float32\), got a bool"),
        ((float("inf"), VT.FLOAT32), r"'adapter.lora.alpha' must be a finite number >= 0"),
        ((-2.0, VT.FLOAT32), r"'adapter.lora.alpha' must be a finite number >= 0, got -2.0"),
    ],
)
def test_lora_alpha_of_the_wrong_type_is_one_line(tmp_path: Path, alpha_kv, pattern) -> None:
    path = _adapter(tmp_path, alpha_kv)
    with pytest.raises(GGUFError) as info:
        LoraAdapter.read(path)
    assert "\n" not in str(info.value) and re.search(pattern, str(info.value)), info.value


def test_lora_alpha_number_or_absent_reads(tmp_path: Path) -> None:
    assert LoraAdapter.read(_adapter(tmp_path, None)).alpha == 0.0
    assert LoraAdapter.read(_adapter(tmp_path, (16, VT.UINT32))).alpha == 16.0
