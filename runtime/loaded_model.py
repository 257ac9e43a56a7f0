"""LoadedModel: everything one model brings, loaded together — file, config, tokenizer,
chat template, executable model, and what its Modelfile set.

A reference is a path to a .gguf file, a stored model (`tandem create`), or the name of a
pullable model (pulled and registered on first use); modelfiles/resolver.py resolves it.
The chat template is, in order of precedence: the Modelfile's TEMPLATE (Go-template form),
the GGUF's own tokenizer.chat_template, the architecture's built-in.
"""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loaders.chat_template import ChatTemplate, prompt_ids, template_for
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from loaders.lora_adapter import LoraAdapter
from loaders.tokenizer import Tokenizer
from modelfiles.prompt_template import GoTemplate
from modelfiles.resolver import ModelSpec
from modelfiles.resolver import resolve as resolve_spec
from runtime.models import Model, build_model
from runtime.models.lora import attach_adapters
from runtime.placement.auto_placement import planned
from runtime.placement.device_map import DeviceMap
from runtime.run_options import RunOptions
from runtime.sampling_params import OLLAMA_OPTIONS, SamplingParams

log = logging.getLogger(__name__)

# Decides where each part of a model runs, from its file and config.
Placement = Callable[[GGUFFile, ModelConfig], DeviceMap]


def resolve(ref: str | Path) -> tuple[str, Path]:
    """(display name, GGUF path) for a path or a model name."""
    spec = resolve_spec(ref)
    return spec.name, spec.path


@dataclass
class LoadedModel:
    name: str
    path: Path
    gguf: GGUFFile
    config: ModelConfig
    tokenizer: Tokenizer
    template: ChatTemplate | GoTemplate
    model: Model
    load_seconds: float
    # What a Modelfile adds (empty for a bare GGUF file): PARAMETERs by ollama
    # name, typed (e.g. {"temperature": 0.3, "num_ctx": 8192, "stop": ["<|im_end|>"]}),
    # and the SYSTEM prompt and MESSAGEs that open every conversation.
    parameters: dict = field(default_factory=dict)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    # The run's settings, resolved once (defaults ▸ Modelfile ▸ flags) and clamped to the
    # model's trained context: the planner, the engine and the threads follow these.
    options: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def load(
        cls,
        ref: str | Path | ModelSpec,
        placement: Placement | None = None,
        options: RunOptions | None = None,
        base: dict | None = None,
    ) -> LoadedModel:
        """`ref`: a path, a model name, or a ModelSpec already resolved. `options`: the run's
        settings, already resolved with the Modelfile's PARAMETERs (default: resolved here,
        `base` ▸ the Modelfile). placement(gguf, config) → DeviceMap decides where each part
        runs (default: the planner's choice for `options` where there is a CUDA device, else
        everything on the CPU)."""
        spec = ref if isinstance(ref, ModelSpec) else resolve_spec(ref)
        if options is None:
            options = RunOptions.resolve(spec.parameters, base=base)
        start = time.perf_counter()
        adapters = [LoraAdapter.read(path) for path in spec.adapters]
        gguf = _open_gguf(spec.path)
        config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors.keys())
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
        template = _template(spec, gguf, config, tokenizer)
        options = options.for_model(config.n_ctx_train)
        placement = placement or planned(options.plan_request())
        model = _build_model(gguf, config, placement(gguf, config))
        model.num_threads = options.num_thread
        attach_adapters(model, adapters)  # wraps this model's layers; the base stays shared
        gguf.detach()  # the weights now own their memory: a truncated file cannot SIGBUS us
        return cls(
            spec.name,
            spec.path,
            gguf,
            config,
            tokenizer,
            template,
            model,
            time.perf_counter() - start,
            spec.parameters,
            spec.system,
            spec.messages,
            options,
        )

    def sampling_defaults(self, base: SamplingParams) -> SamplingParams:
        """`base` with the model's sampling PARAMETERs applied; a request's own options are
        applied on top of this by the caller."""
        sampling = {k: v for k, v in self.parameters.items() if k in OLLAMA_OPTIONS}
        return SamplingParams.from_options(sampling, base) if sampling else base

    def conversation(self, messages: list[dict]) -> list[dict]:
        """The Modelfile's SYSTEM and MESSAGEs, then `messages`. A leading system message of
        the caller's own replaces SYSTEM and stays first (ollama would put it after the
        MESSAGEs, which templates such as Gemma's refuse)."""
        if not isinstance(messages, list):
            return messages  # the template's validation says what is wrong
        head: list[dict] = []
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            head, messages = [messages[0]], messages[1:]
        elif self.system:
            head = [{"role": "system", "content": self.system}]
        return [*head, *self.messages, *messages]

    def chat_prompt_ids(
        self, messages: list[dict], max_tokens: int | None = None, **extra: Any
    ) -> list[int]:
        """Render the conversation (SYSTEM and MESSAGEs first) with the chat template and
        tokenize, adding BOS only once. Only the template's markup yields control tokens:
        special-token texts inside messages are plain text (loaders.chat_template.prompt_ids).
        With max_tokens, ContextLengthError as soon as the prompt certainly exceeds it.
        `extra`: template variables (tools, enable_thinking, other chat_template_kwargs)."""
        conversation = self.conversation(messages)
        return prompt_ids(
            self.template, self.tokenizer, conversation, max_tokens=max_tokens, **extra
        )


def _build_model(gguf: GGUFFile, config: ModelConfig, devices: DeviceMap) -> Model:
    """The model on `devices`; when the GPU runs out of memory anyway (other processes took
    VRAM since it was measured), again with fewer GPU layers, saying so."""
    while True:
        try:
            return build_model(gguf, config, devices)
        except torch.OutOfMemoryError as err:
            fewer = devices.fewer_gpu_layers()
            if fewer is None:
                raise
            log.warning(
                "GPU allocation failed with %s (%s); retrying with %s",
                devices.describe(),
                str(err).splitlines()[0],
                fewer.describe(),
            )
            devices = fewer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# One mapping per GGUF file, shared by every model loaded from it: custom models on one base
# (their own SYSTEM, PARAMETERs, LoRA adapters) hold one copy of its weights.
_OPEN: weakref.WeakValueDictionary[tuple, GGUFFile] = weakref.WeakValueDictionary()


def _open_gguf(path: Path) -> GGUFFile:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    gguf = _OPEN.get(key)
    if gguf is None or gguf.closed:
        gguf = _OPEN[key] = GGUFFile(path)
    return gguf


def _template(
    spec: ModelSpec, gguf: GGUFFile, config: ModelConfig, tokenizer: Tokenizer
) -> ChatTemplate | GoTemplate:
    """The Modelfile's TEMPLATE, else the GGUF's chat template, else the architecture's."""
    bos = tokenizer.token_str(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_str(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    if spec.template is not None:
        return GoTemplate(spec.template, bos, eos)
    return template_for(gguf.metadata, config.arch, bos, eos)
