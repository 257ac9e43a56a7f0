"""ModelSizes: what a model costs to place — the packed bytes and element count of each tensor,
grouped as the planner places them, the KV bytes per token and the compute buffers.

Groups: "embd" (token_embd: the lookup reads one row per token), "head" (output_norm and
output.weight, or token_embd again when the head is tied), and per layer "attn", "ffn" and
"experts" (a mixture of experts' routed ffn_*_exps tensors, of which a token reads only the
experts it is routed to; the router ffn_gate_inp is "ffn").
Multi-token-prediction blocks (after the decoder layers) are not placed: `nextn_bytes`.
Within a layer, `rank` orders tensors as the forward pass uses them; the layer's attention
over its KV comes at KV_RANK (after q/k/v, before attn_output).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from loaders.config import ModelConfig
from quant.errors import InvalidParameterError
from runtime.kv.kv_pool import BLOCK_SIZE, KV_CACHE_TYPES, QBLOCK, kv_bytes_per_token

# forward order of a layer's tensors (by name after "blk.N."); unknown names come last
_ORDER = (
    "attn_norm",
    "attn_qkv",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_q_norm",
    "attn_k_norm",
    "KV",
    "attn_output",
    "post_attention_norm",
    "ffn_norm",
    "ffn_gate_inp",
    "ffn_gate_exps",
    "ffn_up_exps",
    "ffn_down_exps",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "post_ffw_norm",
)
KV_RANK = _ORDER.index("KV")
_LAYER = re.compile(r"blk\.(\d+)\.([a-z_]+)")


class SizedTensor(Protocol):
    """What ModelSizes reads of a tensor (loaders.gguf_parse.TensorInfo has it)."""

    # read-only (properties), so that frozen dataclasses such as TensorInfo match
    @property
    def nbytes(self) -> int: ...

    @property
    def ggml_type(self) -> int: ...

    @property
    def n_elements(self) -> int: ...


@dataclass(frozen=True)
class TensorSize:
    name: str
    nbytes: int
    n_elements: int
    ggml_type: int
    layer: int | None  # None outside the blocks
    group: str  # "embd" | "head" | "attn" | "ffn" | "experts"
    rank: int  # forward order within its layer (or 0 outside the blocks)


def _classify(name: str) -> tuple[int | None, str, int]:
    m = _LAYER.match(name)
    if not m:
        return None, "embd" if name.startswith("token_embd") else "head", 0
    stem = m.group(2)
    rank = _ORDER.index(stem) if stem in _ORDER else len(_ORDER)
    group = "ffn" if stem.startswith(("ffn", "post_ffw")) else "attn"
    group = "experts" if stem.endswith("_exps") else group
    return int(m.group(1)), group, rank


@dataclass(frozen=True)
class ModelSizes:
    config: ModelConfig
    tensors: tuple[TensorSize, ...]
    nextn_bytes: int = 0  # the MTP blocks' tensors, left unread in the file

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Mapping[str, SizedTensor]) -> ModelSizes:
        """From a GGUF's tensor table (GGUFFile.tensors), or any name → sized mapping. A
        multi-token-prediction block (qwen35's blk.{n_layer}…) is left out: it is never loaded
        (its bytes stay unread in the file's mapping), so it costs no memory to place."""
        sized, nextn = [], 0
        for name, info in tensors.items():
            layer, group, rank = _classify(name)
            if layer is not None and layer >= config.n_layer:
                nextn += info.nbytes
                continue
            sized.append(
                TensorSize(name, info.nbytes, info.n_elements, info.ggml_type, layer, group, rank)
            )
        return cls(config, tuple(sized), nextn)

    def layer_tensors(self, i: int) -> list[TensorSize]:
        """Layer i's tensors in forward order."""
        return sorted((t for t in self.tensors if t.layer == i), key=lambda t: t.rank)

    def named(self, name: str) -> TensorSize | None:
        return next((t for t in self.tensors if t.name == name), None)

    @property
    def embd(self) -> TensorSize:
        return next(t for t in self.tensors if t.group == "embd")

    def head_tensors(self) -> list[TensorSize]:
        """The head's tensors; for a tied head, token_embd stands in for output.weight."""
        heads = [t for t in self.tensors if t.group == "head"]
        return heads + [self.embd] if self.config.tied_head else heads

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def kv_bytes_per_token_layer(config: ModelConfig, kv_type: str) -> int:
    """Bytes one token position takes in one layer's KV (keys and values), as KVPool stores
    them: f16, or q8_0 (34 bytes per 32 values; head sizes must be multiples of 32)."""
    if kv_type not in KV_CACHE_TYPES:
        raise InvalidParameterError(
            f"KV type must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_type!r}"
        )
    if kv_type == "q8_0" and (config.head_dim % QBLOCK or config.head_dim_v % QBLOCK):
        raise InvalidParameterError(
            f"KV type q8_0 needs head sizes divisible by {QBLOCK}; "
            f"this model has {config.head_dim}/{config.head_dim_v}: "
            "use f16"
        )
    return kv_bytes_per_token(config, kv_type) // config.n_layer


def kv_slots(num_ctx: int, num_parallel: int) -> int:
    """Token slots allocated for num_parallel sequences of num_ctx (whole KV blocks)."""
    return math.ceil(num_ctx / BLOCK_SIZE) * BLOCK_SIZE * num_parallel


def activation_bytes(config: ModelConfig, num_batch: int) -> int:
    """float32 activations of one layer for num_batch tokens: hidden, residual and norm
    copies, q/k/v and attention output, gate/up/product."""
    c = config
    width = (
        3 * c.n_embd + c.n_head * c.head_dim + 2 * c.kv_dim + c.n_head * c.head_dim_v + 3 * c.n_ff
    )
    return 4 * num_batch * width


def scores_bytes(config: ModelConfig, num_batch: int, num_ctx: int) -> int:
    """float32 attention scores of a prefill chunk when materialised (the CPU path)."""
    return 4 * config.n_head * num_batch * num_ctx


def logits_bytes(config: ModelConfig, num_parallel: int) -> int:
    return 4 * config.vocab_size * max(1, num_parallel)
