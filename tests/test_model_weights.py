"""Loading a model (runtime/models): the architecture registry, and weights that own their
memory — after load nothing the model keeps is a view of the GGUF mapping, so the mapping
can be closed (and a file truncated under a running model cannot fault it: issue 13)."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from test_model_synthetic import make_weights, write_gguf

from loaders.config import SUPPORTED, ModelConfig
from loaders.gguf_file import GGUFFile
from quant.errors import UnsupportedError
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.models import ARCHITECTURES, build_model
from runtime.models.gemma3 import Gemma3
from runtime.models.llama import Llama


def test_registry_maps_each_architecture_to_its_file():
    assert {a: c.__module__ for a, c in ARCHITECTURES.items()} == {
        "llama": Llama.__module__,
        "mistral": Llama.__module__,
        "qwen2": Llama.__module__,
        "gemma3": Gemma3.__module__,
        **{a: f"runtime.models.{a}" for a in ("qwen3", "olmo2", "granite", "phi3", "gemma2")},
        **{
            a: f"runtime.models.{a}"
            for a in ("smollm3", "mistral3", "qwen3moe", "qwen35", "qwen35moe")
        },
        "bert": "runtime.models.bert",
        "gpt-oss": "runtime.models.gpt_oss",
    }
    assert set(ARCHITECTURES) == set(SUPPORTED)  # the loader's list and the models agree


def test_an_architecture_without_a_file_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", make_weights("llama"))
    gguf_file = GGUFFile(path)
    config = ModelConfig.from_metadata(gguf_file.metadata, gguf_file.tensors.keys())
    with pytest.raises(UnsupportedError, match="'falcon'"):
        build_model(gguf_file, dataclasses.replace(config, arch="falcon"))


def logits_of(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return ModelRunner(model, 2).run(ForwardBatch.build([(tokens, 0, [0, 1], True)]))


def closed_after_load(path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model built from `path` before and after its GGUFFile is closed; asserts
    the mapping itself was freed (no view of it outlived the close)."""
    gguf_file = GGUFFile(path)
    mapping = weakref.ref(gguf_file._mmap)
    config = ModelConfig.from_metadata(gguf_file.metadata, gguf_file.tensors.keys())
    model = build_model(gguf_file, config)
    tokens = [1, 5, 9, 2, 7]
    before = logits_of(model, tokens)
    gguf_file.close()
    gc.collect()
    assert mapping() is None, "a tensor the model keeps still views the GGUF mapping"
    return before, logits_of(model, tokens)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_loaded_model_holds_no_view_of_the_file(tmp_path, arch):
    """F32 weights (the torch path: owned rows), norms, biases, an untied head."""
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, make_weights(arch))
    before, after = closed_after_load(path)
    assert torch.equal(before, after)


def test_smollm2_holds_no_view_of_the_file(smollm2_path):
    """Quantized linears (panels where the build has them), a tied Q8_0 head/embedding."""
    before, after = closed_after_load(smollm2_path)
    assert torch.equal(before, after)
