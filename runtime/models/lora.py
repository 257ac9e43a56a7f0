"""Attaching LoRA adapters to a loaded Model: each adapted weight's layer is wrapped in a
LoraLinear (kernels/lora_linear.py), in the model's own Layer objects; the base layers
themselves (the weights loaded once per file, runtime/models/weights.py) are shared, not copied.

Adaptable weights: every layer's attn_q/k/v/output and ffn_gate/up/down, and output.weight
when the model has its own head. Adapters for anything else (token_embd, norms) are refused
with UnsupportedError, as is an adapter made for another architecture or another shape.
"""

from __future__ import annotations

import re
from collections import defaultdict

from kernels.lora_linear import LoraLinear
from loaders.lora_adapter import LoraAdapter, LoraWeight
from quant.errors import UnsupportedError
from runtime.models import Model

_FIELDS = {
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def attach_adapters(model: Model, adapters: list[LoraAdapter]) -> None:
    """Wrap the adapted layers of `model` (which must not be shared with other models)."""
    deltas: dict[str, list[LoraWeight]] = defaultdict(list)
    for adapter in adapters:
        if adapter.arch and adapter.arch != model.config.arch:
            raise UnsupportedError(
                f"{adapter.path.name} is a LoRA for {adapter.arch}, but the "
                f"model is {model.config.arch}"
            )
        for name, weight in adapter.weights.items():
            deltas[name].append(weight)
    for name, weights in deltas.items():
        _wrap(model, name, weights)


def _wrap(model: Model, name: str, weights: list[LoraWeight]) -> None:
    match = _BLOCK.fullmatch(name)
    if match and int(match.group(1)) < len(model.layers) and match.group(2) in _FIELDS:
        layer, field = model.layers[int(match.group(1))], _FIELDS[match.group(2)]
        setattr(layer, field, _checked(name, getattr(layer, field), weights))
    elif name == "output.weight" and not model.config.tied_head:
        model.head = _checked(name, model.head, weights)
    else:
        raise UnsupportedError(
            f"the adapter changes {name!r}, which tandem cannot adapt "
            "(it adapts blk.N attention and FFN weights and output.weight)"
        )


def _checked(name: str, base, weights: list[LoraWeight]) -> LoraLinear:
    try:
        return LoraLinear(base, weights)
    except ValueError as err:
        raise UnsupportedError(
            f"the adapter does not fit {name}: {err}; was it made for this base model?"
        ) from None
