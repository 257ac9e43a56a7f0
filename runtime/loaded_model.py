"""LoadedModel: everything one GGUF brings, loaded together — file, config, tokenizer,
chat template, executable model — plus how a user's model reference resolves to a file.

A reference is a path to a .gguf file or the name of a pullable model (pulled on first use).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from loaders.chat_template import ChatTemplate, template_for
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from loaders.pull import pull, pullable
from loaders.tokenizer import Tokenizer
from runtime.errors import ModelNotFoundError
from runtime.model import Model
from runtime.sampling_params import OLLAMA_OPTIONS, SamplingParams


def resolve(ref: str | Path) -> tuple[str, Path]:
    """(display name, GGUF path) for a path or a pullable model name."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path.name, path
    text = str(ref)
    if text.endswith(".gguf") or "/" in text:
        raise ModelNotFoundError(f"no model file at {path}")
    entry = pullable(text)  # raises with the list of known names
    return entry.name, pull(entry.name)


@dataclass
class LoadedModel:
    name: str
    path: Path
    gguf: GGUFFile
    config: ModelConfig
    tokenizer: Tokenizer
    template: ChatTemplate
    model: Model
    load_seconds: float
    # What a Modelfile adds (empty for a bare GGUF or pullable name): PARAMETERs by ollama
    # name, typed (e.g. {"temperature": 0.3, "num_ctx": 4096, "stop": ["<|im_end|>"]}),
    # and the SYSTEM prompt and MESSAGEs that open every conversation.
    parameters: dict = field(default_factory=dict)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, ref: str | Path) -> LoadedModel:
        name, path = resolve(ref)
        start = time.perf_counter()
        gguf = GGUFFile(path)
        config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors.keys())
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
        bos = tokenizer.token_str(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
        eos = tokenizer.token_str(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
        template = template_for(gguf.metadata, config.arch, bos, eos)
        model = Model(gguf, config)
        return cls(name, path, gguf, config, tokenizer, template, model,
                   time.perf_counter() - start)

    def sampling_defaults(self, base: SamplingParams) -> SamplingParams:
        """`base` with the model's sampling PARAMETERs applied; a request's own options are
        applied on top of this by the caller."""
        sampling = {k: v for k, v in self.parameters.items() if k in OLLAMA_OPTIONS}
        return SamplingParams.from_options(sampling, base) if sampling else base

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """Render messages with the chat template and tokenize, adding BOS only once."""
        text = self.template.render(messages, add_generation_prompt=True)
        bos = self.template.bos_token
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer.encode(text, add_special=add_special, parse_special=True)
