"""Mixture-of-experts layers on the "GPU" — Triton's kernels, run by its CPU interpreter here
(with CUDA, on the GPU) — against the all-CPU run of the same synthetic file: the last layer
whole on the GPU (routed experts through kernels/triton/moe.py), and the MoE split (that
layer on the GPU, its routed experts pinned to the CPU kernels). The paths differ in numerics
(the CPU quantizes activations to 8 bits), so logits agree to a tolerance and the greedy
(argmax) ids agree exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType as T
from moe_reference import LAYERS, make_weights, write_gguf
from reference_model import KVCache, forward

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.models import build_model
from runtime.placement.device_map import CPU, DeviceMap

TOKENS = [3, 17, 42, 8, 29, 11, 5, 40]


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        cache = KVCache(model.config, 32)
        steps = [forward(model, torch.tensor(TOKENS[:4]), 0, cache, all_logits=True)]
        steps += [
            forward(model, torch.tensor([t]), pos, cache).to("cpu")
            for pos, t in enumerate(TOKENS[4:], start=4)
        ]
    return torch.cat([s.to("cpu") for s in steps])


@pytest.mark.parametrize(("arch", "qtype"), [("qwen3moe", T.Q8_0), ("gpt-oss", T.MXFP4)])
def test_moe_layer_on_gpu_equals_all_cpu(tmp_path, arch, qtype):
    pytest.importorskip("kernels.triton")  # sets TRITON_INTERPRET before triton loads
    write_gguf(tmp_path / "m.gguf", arch, make_weights(arch, seed=4), qtype)
    gguf = GGUFFile(tmp_path / "m.gguf")
    config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors)
    cpu = _logits(build_model(gguf, config))
    last = DeviceMap.last_layers(gguf.tensors.keys(), LAYERS, 1)
    split = dataclasses.replace(
        last, tensors={n: CPU if "_exps" in n else d for n, d in last.tensors.items()}
    )
    for devices in (last, split):
        model = build_model(gguf, config, devices)
        layer = model.layers[-1]
        assert layer.triton
        assert (layer.moe.gate._module is None) == (devices is last)  # Triton's, or moe.cpp's
        got = _logits(model)
        assert (got - cpu).abs().max().item() < 0.03 * cpu.abs().max().item()
        assert torch.equal(got.argmax(-1), cpu.argmax(-1))
