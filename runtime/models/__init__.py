"""Architectures: one file each, its tensor names and layer math (a Model subclass), found
by the GGUF's `general.architecture`.

    model = build_model(gguf, config, devices)
"""

from __future__ import annotations

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from quant.errors import UnsupportedError
from runtime.models.base import Layer, Model
from runtime.models.bert import Bert
from runtime.models.gemma2 import Gemma2
from runtime.models.gemma3 import Gemma3
from runtime.models.gpt_oss import GptOss
from runtime.models.granite import Granite
from runtime.models.llama import Llama
from runtime.models.mistral3 import Mistral3
from runtime.models.olmo2 import Olmo2
from runtime.models.phi3 import Phi3
from runtime.models.qwen3 import Qwen3
from runtime.models.qwen3moe import Qwen3Moe
from runtime.models.qwen35 import Qwen35
from runtime.models.qwen35moe import Qwen35Moe
from runtime.models.smollm3 import SmolLM3
from runtime.placement.device_map import DeviceMap

__all__ = ["ARCHITECTURES", "Layer", "Model", "build_model"]

ARCHITECTURES: dict[str, type[Model]] = {
    arch: cls
    for cls in (
        Llama,
        Qwen3,
        Olmo2,
        Granite,
        SmolLM3,
        Phi3,
        Gemma2,
        Gemma3,
        Mistral3,
        Qwen3Moe,
        GptOss,
        Qwen35,
        Qwen35Moe,
        Bert,
    )
    for arch in cls.architectures
}


def build_model(gguf: GGUFFile, config: ModelConfig, devices: DeviceMap | None = None) -> Model:
    """The model of `config.arch` with its weights loaded onto `devices` (default: CPU)."""
    cls = ARCHITECTURES.get(config.arch)
    if cls is None:
        raise UnsupportedError(
            f"unsupported architecture {config.arch!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    return cls(gguf, config, devices)
