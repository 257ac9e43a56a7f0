"""Each architecture of runtime/models on a tiny random-weight GGUF (tests/arch_models.py)
against the plain forward written there from llama.cpp's graph: the whole prompt at once,
then a prefill and one token at a time (the native paged decode where it applies), and the
engine's paged path (ModelRunner)."""

from __future__ import annotations

import pytest
import torch
from arch_models import ARCHS, gguf_arch, make_weights, reference_logits, write_gguf
from reference_model import KVCache, forward

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.models import build_model
from runtime.placement.device_map import DeviceMap

TOKENS = [3, 17, 42, 8, 29, 11, 5, 40, 1, 22]


def load(tmp_path, arch: str, devices=None):
    weights = make_weights(arch)
    path = tmp_path / f"{arch}.gguf"
    if not path.exists():
        write_gguf(path, arch, weights)
    gguf_file = GGUFFile(path)
    config = ModelConfig.from_metadata(gguf_file.metadata, gguf_file.tensors)
    assert config.arch == gguf_arch(arch)
    return weights, build_model(gguf_file, config, devices)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_plain_reference(tmp_path, arch):
    weights, model = load(tmp_path, arch)
    ref = reference_logits(arch, weights, TOKENS)
    with torch.inference_mode():
        cache = KVCache(model.config, 32, dtype=torch.float32)
        whole = forward(model, torch.tensor(TOKENS), 0, cache, all_logits=True)
        cache = KVCache(model.config, 32)  # f16: the native paged decode kernel
        steps = [forward(model, torch.tensor(TOKENS[:4]), 0, cache, all_logits=True)]
        steps += [
            forward(model, torch.tensor([tok]), pos, cache)
            for pos, tok in enumerate(TOKENS[4:], start=4)
        ]
        runner = ModelRunner(model, 2)
        paged = runner.run(ForwardBatch.build([(TOKENS, 0, [0, 1], True)]))
    tol = 3e-3 if arch == "gemma2" else 1e-4  # the CPU's GELU: ggml's fp16 table
    torch.testing.assert_close(whole, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(torch.cat(steps), ref, rtol=2e-2, atol=2e-2)  # f16 KV
    torch.testing.assert_close(paged, ref[-1:], rtol=2e-2, atol=2e-2)


def paged_steps(model, tokens: list[int], prefill: int) -> torch.Tensor:
    """Logits (n − prefill + 1, V) of a prefill of `prefill` tokens and then one token at a
    time through the engine's paged path (the decode steps: the backends' decode kernels)."""
    runner, table = ModelRunner(model, 2), [0, 1]
    with torch.inference_mode():
        out = [runner.run(ForwardBatch.build([(tokens[:prefill], 0, table, True)]))]
        for pos in range(prefill, len(tokens)):
            out.append(runner.run(ForwardBatch.build([([tokens[pos]], pos, table, True)])))
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["olmo2", "phi3", "gemma2"])
def test_layers_on_the_gpu_path_match_the_cpu_path(tmp_path, arch):
    """Every layer on Triton's kernels (interpreted on CPU tensors here): olmo2's norm-less
    blocks, phi3's fused weights split and stacked again, gemma2's soft-capped decode
    attention over a window (Triton's paged decode kernel) against the CPU path."""
    pytest.importorskip("kernels.triton")  # sets TRITON_INTERPRET before triton loads
    weights, cpu = load(tmp_path, arch)
    n = cpu.config.n_layer
    _, gpu = load(tmp_path, arch, DeviceMap.last_layers(cpu_names(tmp_path, arch), n, n))
    assert all(layer.triton for layer in gpu.layers)
    want = reference_logits(arch, weights, TOKENS)[5:]
    tol = 1e-2  # f16 KV pages (the reference keeps float32)
    torch.testing.assert_close(paged_steps(cpu, TOKENS, 6), want, rtol=tol, atol=tol)
    torch.testing.assert_close(paged_steps(gpu, TOKENS, 6), want, rtol=tol, atol=tol)


def cpu_names(tmp_path, arch: str):
    return GGUFFile(tmp_path / f"{arch}.gguf").tensors.keys()
