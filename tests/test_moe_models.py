"""qwen3moe and gpt-oss forward passes on tiny synthetic GGUFs against the plain float64
transformer of tests/moe_reference.py: float32 experts (the exact math: routing, top-k
weights, clamped SwiGLU, biases, attention sinks, alternating sliding window), and the
quantized experts the real files hold (Q8_0, MXFP4) through the native grouped kernel."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T
from moe_reference import make_weights, quantize_experts, reference_logits, write_gguf
from reference_model import KVCache, forward

from kernels import native_loader
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.models import build_model

TOKENS = [3, 17, 42, 8, 29, 11, 5]


def _load(path):
    gguf_file = GGUFFile(path)
    config = ModelConfig.from_metadata(gguf_file.metadata, gguf_file.tensors)
    return config, build_model(gguf_file, config)


def _run(model, config, dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """(all logits of one prefill, those of a 4-token prefill then single-token decodes), over
    a KV cache of `dtype` (f16: single-token decodes go through the native paged kernel)."""
    with torch.inference_mode():
        cache = KVCache(config, 32, dtype)
        whole = forward(model, torch.tensor(TOKENS), 0, cache, all_logits=True)
        cache = KVCache(config, 32, dtype)
        steps = [forward(model, torch.tensor(TOKENS[:4]), 0, cache, all_logits=True)]
        steps += [
            forward(model, torch.tensor([tok]), pos, cache)
            for pos, tok in enumerate(TOKENS[4:], start=4)
        ]
    return whole, torch.cat(steps)


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss"])
def test_float_experts_match_plain_transformer(tmp_path, arch):
    weights = make_weights(arch)
    write_gguf(tmp_path / "m.gguf", arch, weights)
    config, model = _load(tmp_path / "m.gguf")
    assert (config.n_expert, config.n_expert_used) == (8, 3)
    assert config.attn_sinks == (arch == "gpt-oss")
    assert config.swa_layers == ((True, False) if arch == "gpt-oss" else (False, False))
    ref = reference_logits(weights, TOKENS, arch)
    whole, steps = _run(model, config, torch.float32)  # float32 end to end
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, ref, rtol=1e-4, atol=1e-4)
    whole, steps = _run(model, config)  # f16 KV pages: the paged decode kernel (with sinks)
    for got in (whole, steps):
        assert (got - ref).abs().max().item() < 0.02 * ref.abs().max().item()
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.skipif(not native_loader.available(), reason="the native CPU kernel is not built")
@pytest.mark.parametrize(("arch", "qtype"), [("qwen3moe", T.Q8_0), ("gpt-oss", T.MXFP4)])
def test_quantized_experts_through_native_kernel(tmp_path, arch, qtype):
    weights = make_weights(arch, seed=1)
    write_gguf(tmp_path / "m.gguf", arch, weights, expert_type=qtype)
    config, model = _load(tmp_path / "m.gguf")
    assert model.layers[0].moe.gate._module is not None  # moe.cpp's grouped kernel
    ref = reference_logits(quantize_experts(weights, qtype), TOKENS, arch)
    whole, steps = _run(model, config)
    # activations are quantized to Q8_0 for the expert products (llama.cpp's numerics)
    scale = ref.abs().max().item()
    assert (whole - ref).abs().max().item() < 0.03 * scale
    assert (steps - ref).abs().max().item() < 0.03 * scale
    assert torch.equal(whole.argmax(-1), ref.argmax(-1))
