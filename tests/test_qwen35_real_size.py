"""Complete synthetic Qwen3.5 files at a released size (make_synthetic_gguf.py --arch qwen35
--size 0.8b --type q4_k, the benchmark files of issue 18) at a test's few layers: the tensor
table is the metadata-only file's (names, shapes; without --type its Q4_K_M types too), every
tensor's bytes are in the file, the head has the real 248320 rows (the tokenizer padded), and
a forward through tandem gives finite, non-constant logits.

4 layers, not 2: with full_attention_interval 4 the fourth is the first gated-attention
layer, so the forward covers both layer kinds (and llama.cpp cannot run a model without an
attention layer: llama-bench fails GGML_ASSERT(buffer) on its empty KV cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_script

from kernels import native_loader
from loaders.gguf_file import GGUFFile
from loaders.gguf_parse import TensorInfo
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.loaded_model import LoadedModel
from runtime.run_options import RunOptions

LAYERS = 4
VOCAB = 248320  # Qwen3.5's embedding rows (REAL_VOCAB)
Q4_K, Q6_K, F32 = 12, 14, 0


def table(path) -> dict[str, TensorInfo]:
    with GGUFFile(path) as f:
        return dict(f.tensors)


def write(tmp_path: Path, name: str, *flags: str) -> Path:
    out = tmp_path / f"{name}.gguf"
    make = load_script("make_synthetic_gguf")
    make.main(["--arch", "qwen35", "--size", "0.8b", "--out", str(out), *flags])
    return out


@pytest.fixture(scope="module")
def q4_k(tmp_path_factory, smollm2_path) -> Path:
    tmp = tmp_path_factory.mktemp("qwen35-real")
    return write(
        tmp, "q4_k", "--type", "q4_k", "--layers", str(LAYERS), "--vocab", str(smollm2_path)
    )


def test_q4_k_file_is_complete_at_the_metadata_only_shapes(q4_k, tmp_path):
    full = table(write(tmp_path, "meta", "--metadata-only"))  # all 24 layers
    got = table(q4_k)
    kept = {n: t for n, t in full.items() if not n.startswith("blk.") or int(n.split(".")[1]) < 4}
    assert {n: t.shape for n, t in got.items()} == {n: t.shape for n, t in kept.items()}
    assert got["token_embd.weight"].shape == (1024, VOCAB) and "output.weight" not in got
    for t in got.values():  # matrices Q4_K, the rest (norms, conv1d, ssm_a …) F32
        assert t.ggml_type == (Q4_K if len(t.shape) == 2 and t.shape[0] % 256 == 0 else F32)
    end = max(t.offset + t.nbytes for t in got.values())
    assert q4_k.stat().st_size >= end
    assert q4_k.stat().st_blocks * 512 >= 0.95 * end  # written, not a hole
    with GGUFFile(q4_k) as f:
        tokens = f.metadata["tokenizer.ggml.tokens"]
        assert len(tokens) == VOCAB and tokens[VOCAB - 1] == f"[PAD{VOCAB - 1}]"


def test_without_type_the_tensors_have_q4_k_m_types(tmp_path, smollm2_path):
    layers = ("--layers", str(LAYERS))
    want = table(write(tmp_path, "meta", "--metadata-only", *layers))
    got = table(write(tmp_path, "mix", *layers, "--vocab", str(smollm2_path)))
    assert {n: (t.shape, t.ggml_type) for n, t in got.items()} == {
        n: (t.shape, t.ggml_type) for n, t in want.items()
    }
    assert got["token_embd.weight"].ggml_type == Q6_K  # tied: the output's type
    # use_more_bits of 4 layers: blocks 2 (every third from n/8) and 3 (the last eighth)
    assert [got[f"blk.{i}.ffn_down.weight"].ggml_type for i in range(4)] == [Q4_K, Q4_K, Q6_K, Q6_K]
    assert got["blk.2.attn_qkv.weight"].ggml_type == Q6_K


@pytest.mark.skipif(not native_loader.available(), reason="the native CPU kernel is not built")
def test_forward_gives_finite_logits(q4_k):
    lm = LoadedModel.load(q4_k, options=RunOptions.resolve(flags={"num_thread": 2}))
    runner = ModelRunner(lm.model, 1)
    prompt = [5, 17, 300, 41, 9, 77, 1200, 200000]  # the last one a padding row
    with torch.inference_mode():
        first = runner.run(ForwardBatch.build([(prompt, 0, [0], True)], [0]))
        token = int(first[0].argmax())
        second = runner.run(ForwardBatch.build([([token], len(prompt), [0], True)], [0]))
    for logits in (first, second):
        assert logits.shape == (1, VOCAB)
        assert torch.isfinite(logits).all()
        assert 0.1 < logits.std() < 100  # neither constant nor blown up
