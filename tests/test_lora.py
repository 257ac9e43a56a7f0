"""LoRA adapters (Modelfile ADAPTER) applied at run time: the output equals the model whose
weights have the adapter merged in; custom models on one base share its weights (checked by
identity and by resident memory on the real SmolLM2)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import gguf
import numpy as np
import psutil
import pytest
import torch
from reference_model import KVCache, forward
from test_store import fresh_home, write_tiny_llama

from loaders.lora_adapter import LoraAdapter
from modelfiles.builder import create_model
from modelfiles.names import ModelName
from modelfiles.parser import parse_modelfile
from modelfiles.store import Store
from quant.errors import ModelfileError, UnsupportedError
from runtime.loaded_model import LoadedModel

RANK, ALPHA = 4, 8.0
TOKENS = [5, 17, 42, 8, 29, 11, 3]


def write_adapter(
    path: Path,
    pairs: dict[str, tuple[np.ndarray, np.ndarray]],
    alpha: float | None = ALPHA,
    arch: str = "llama",
    dtype=np.float16,
) -> None:
    """An adapter as convert_lora_to_gguf.py lays it out: A (r, in), B (out, r)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", alpha)
    for name, (a, b) in pairs.items():
        writer.add_tensor(f"{name}.lora_a", a.astype(dtype))
        writer.add_tensor(f"{name}.lora_b", b.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_pairs(weights: dict[str, np.ndarray], names: list[str], seed: int = 1):
    g = np.random.default_rng(seed)
    return {
        n: (
            (g.standard_normal((RANK, weights[n].shape[1])) * 0.3).astype(np.float32),
            (g.standard_normal((weights[n].shape[0], RANK)) * 0.3).astype(np.float32),
        )
        for n in names
    }


def write_merged(path: Path, weights: dict[str, np.ndarray], pairs, scale: float) -> None:
    """The reference: the same model with W + scale·B·A written into its weights."""
    merged = dict(weights)
    for name, (a, b) in pairs.items():
        a16, b16 = a.astype(np.float16).astype(np.float32), b.astype(np.float16).astype(np.float32)
        merged[name] = weights[name] + scale * (b16 @ a16)
    tmp = path.with_suffix(".tmp.gguf")
    write_tiny_llama(tmp)  # metadata and tokenizer; tensors replaced below
    src = gguf.GGUFReader(tmp)
    writer = gguf.GGUFWriter(str(path), "llama")
    for field in src.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for name, array in merged.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits(lm: LoadedModel) -> torch.Tensor:
    with torch.inference_mode():
        cache = KVCache(lm.config, 32, dtype=torch.float32)
        return forward(lm.model, torch.tensor(TOKENS), 0, cache, all_logits=True)


ADAPTED = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight", "output.weight"]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    fresh_home(tmp_path / "home", monkeypatch)
    weights = write_tiny_llama(tmp_path / "tiny.gguf")
    pairs = random_pairs(weights, ADAPTED)
    write_adapter(tmp_path / "lora.gguf", pairs)
    write_merged(tmp_path / "merged.gguf", weights, pairs, ALPHA / RANK)
    return tmp_path, weights, pairs


def create(name: str, text: str, directory: Path):
    return create_model(Store(), ModelName.parse(name), parse_modelfile(text), directory)


def test_adapter_file_is_read_as_llama_cpp_lays_it_out(tiny):
    tmp_path, weights, pairs = tiny
    adapter = LoraAdapter.read(tmp_path / "lora.gguf")
    assert adapter.alpha == ALPHA and set(adapter.weights) == set(ADAPTED)
    w = adapter.weights["blk.0.ffn_down.weight"]
    a, b = pairs["blk.0.ffn_down.weight"]
    assert w.a.shape == a.shape and w.b.shape == b.shape and w.rank == RANK
    assert w.scale == ALPHA / RANK
    torch.testing.assert_close(w.a, torch.from_numpy(a.astype(np.float16).astype(np.float32)))


def test_runtime_lora_equals_the_merged_weights(tiny):
    tmp_path, _, _ = tiny
    create("base", "FROM tiny.gguf\n", tmp_path)
    create("tuned", "FROM base\nADAPTER ./lora.gguf\nSYSTEM tuned\n", tmp_path)
    tuned, merged = LoadedModel.load("tuned"), LoadedModel.load(tmp_path / "merged.gguf")
    base = LoadedModel.load("base")
    got, want, plain = logits(tuned), logits(merged), logits(base)
    # F32 weights run through the torch path in float32: the unmerged sum differs from the
    # merged weights only by rounding order (measured: max |diff| 2e-5 on logits up to 12,
    # i.e. 2e-6 relative)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (plain - want).abs().max() > 0.1  # the adapter does change the output
    # one copy of the base: the same mapping, the same weight bytes, wrapped not copied
    assert tuned.gguf is base.gguf
    assert (
        tuned.model.layers[0].q.base.weight.data_ptr() == base.model.layers[0].q.weight.data_ptr()
    )
    assert tuned.model.layers[0].k is not base.model.layers[0].k  # own Layer, not adapted
    assert tuned.model.layers[0].k.weight.data_ptr() == base.model.layers[0].k.weight.data_ptr()


def test_alpha_absent_means_scale_one(tiny):
    tmp_path, weights, _ = tiny
    pairs = random_pairs(weights, ["blk.0.attn_k.weight"], seed=3)
    write_adapter(tmp_path / "noalpha.gguf", pairs, alpha=None, dtype=np.float32)
    w = LoraAdapter.read(tmp_path / "noalpha.gguf").weights["blk.0.attn_k.weight"]
    assert w.scale == 1.0
    a, b = pairs["blk.0.attn_k.weight"]
    torch.testing.assert_close(w.delta(), torch.from_numpy(b @ a), rtol=1e-5, atol=1e-6)


def test_adapters_that_do_not_fit_are_refused_at_create(tiny):
    tmp_path, weights, _ = tiny
    write_adapter(
        tmp_path / "qwen.gguf", random_pairs(weights, ["blk.0.attn_q.weight"]), arch="qwen2"
    )
    with pytest.raises(ModelfileError, match="qwen2"):
        create("x", "FROM tiny.gguf\nADAPTER qwen.gguf\n", tmp_path)
    bad = {
        "blk.0.attn_q.weight": (np.zeros((RANK, 32), np.float32), np.zeros((64, RANK), np.float32))
    }
    write_adapter(tmp_path / "shape.gguf", bad)
    with pytest.raises(ModelfileError, match="made for this base"):
        create("x", "FROM tiny.gguf\nADAPTER shape.gguf\n", tmp_path)
    write_adapter(tmp_path / "embd.gguf", random_pairs(weights, ["token_embd.weight"]))
    create("embd", "FROM tiny.gguf\nADAPTER embd.gguf\n", tmp_path)
    with pytest.raises(UnsupportedError, match="token_embd"):
        LoadedModel.load("embd")
    with pytest.raises(ModelfileError, match="no such file"):
        create("x", "FROM tiny.gguf\nADAPTER missing.gguf\n", tmp_path)


def _rss() -> int:
    gc.collect()
    return psutil.Process(os.getpid()).memory_info().rss


def test_two_custom_models_hold_one_copy_of_smollm2(tmp_path, monkeypatch, smollm2_path):
    home = fresh_home(tmp_path / "home", monkeypatch)
    (home / "models" / "blobs").mkdir(parents=True)
    os.symlink(smollm2_path, home / "models" / "blobs" / smollm2_path.name)
    g = np.random.default_rng(0)
    write_adapter(
        tmp_path / "q.gguf",
        {
            "blk.0.attn_q.weight": (
                (g.standard_normal((RANK, 576)) * 0.01).astype(np.float32),
                (g.standard_normal((576, RANK)) * 0.01).astype(np.float32),
            )
        },
    )
    create("terse", "FROM smollm2\nSYSTEM Be terse.\n", tmp_path)
    create("tuned", "FROM smollm2\nADAPTER q.gguf\nSYSTEM Be kind.\n", tmp_path)
    size = smollm2_path.stat().st_size
    before = _rss()
    first = LoadedModel.load("terse")
    logits(first)  # touches every weight page
    one = _rss() - before
    second = LoadedModel.load("tuned")
    logits(second)
    two = _rss() - before
    print(
        f"\nRSS: +{one / 2**20:.1f} MiB after the first model, +{two / 2**20:.1f} MiB "
        f"after both (the GGUF is {size / 2**20:.1f} MiB)"
    )
    assert second.gguf is first.gguf
    # the second model adds its own tokenizer tables (measured ≈ 18 MiB for SmolLM2's 49k
    # BPE vocabulary), norms and adapter: not another copy of the 94 MiB of weights
    assert two - one < 0.4 * size
