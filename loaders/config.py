"""ModelConfig: the frozen description of a model's shape, built from GGUF metadata.

Supported architectures: the llama family (llama, mistral, qwen2 with q/k/v biases) and
gemma3 (QK-norm, pre- and post-norms, gelu-tanh, embedding scale, sliding-window layers with
their own rope base, tied head).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from runtime.errors import GGUFError, UnsupportedError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = (*LLAMA_FAMILY, "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/query head size
    head_dim_v: int  # value head size
    n_ctx_train: int
    vocab_size: int
    rms_eps: float
    rope_base: float
    rope_base_swa: float  # rope base of sliding-window layers (== rope_base when none)
    rope_scale: float  # linear rope scaling factor (1.0: none)
    rope_neox: bool  # rotate halves (NEOX) rather than adjacent pairs
    sliding_window: int  # 0: no sliding-window layers
    swa_layers: tuple[bool, ...]
    activation: str  # "silu" | "gelu_tanh"
    qk_norm: bool
    post_norms: bool  # post-attention and post-FFN norms (gemma)
    embed_scale: float  # token embeddings are multiplied by this (gemma: sqrt(n_embd))
    attn_scale: float  # softmax(q·k * attn_scale)
    tied_head: bool  # no output.weight: the head reuses token_embd
    attn_bias: bool  # q/k/v projections carry biases (qwen2)

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_metadata(cls, md: dict[str, Any], tensor_names: Collection[str]) -> ModelConfig:
        arch = md.get("general.architecture")
        if arch not in SUPPORTED:
            raise UnsupportedError(
                f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED)})"
            )
        get = _getter(md, arch)
        n_embd, n_head = get("embedding_length"), get("attention.head_count")
        n_head_kv = get("attention.head_count_kv", n_head)
        n_layer = get("block_count")
        for key, value in (
            ("embedding_length", n_embd),
            ("attention.head_count", n_head),
            ("attention.head_count_kv", n_head_kv),
            ("block_count", n_layer),
        ):
            _check_positive(arch, key, value)
        if n_head % n_head_kv:
            raise GGUFError(
                f"metadata key '{arch}.attention.head_count' ({n_head}) is not a "
                f"multiple of '{arch}.attention.head_count_kv' ({n_head_kv})"
            )
        head_dim = get("attention.key_length", n_embd // n_head)
        for key, value in (
            ("attention.key_length", head_dim),
            ("attention.value_length", get("attention.value_length", head_dim)),
            ("feed_forward_length", get("feed_forward_length")),
            ("context_length", get("context_length", 2048)),
        ):
            _check_positive(arch, key, value)
        gemma = arch == "gemma3"
        window = get("attention.sliding_window", 0) if gemma else 0
        scaling = md.get(f"{arch}.rope.scaling.type")
        factor = float(md.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=get("feed_forward_length"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=get("attention.value_length", head_dim),
            n_ctx_train=get("context_length", 2048),
            vocab_size=_vocab_size(md, arch),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_base_swa=10000.0 if window else float(get("rope.freq_base", 10000.0)),
            rope_scale=factor,
            rope_neox=arch in ("qwen2", "gemma3"),
            sliding_window=window,
            # gemma3: five sliding-window layers, then one global layer, repeating
            swa_layers=tuple(bool(window) and (i % 6) < 5 for i in range(n_layer)),
            activation="gelu_tanh" if gemma else "silu",
            qk_norm=gemma,
            post_norms=gemma,
            embed_scale=math.sqrt(n_embd) if gemma else 1.0,
            attn_scale=1.0 / math.sqrt(head_dim),
            tied_head="output.weight" not in tensor_names,
            attn_bias="blk.0.attn_q.bias" in tensor_names,
        )


def _getter(md: dict[str, Any], arch: str):
    missing = object()

    def get(key: str, default: Any = missing) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is missing:
            raise GGUFError(f"metadata key '{arch}.{key}' is missing; the file is incomplete")
        if isinstance(value, list) and value:  # per-layer arrays: tandem takes the first
            value = value[0]
        return value

    return get


def _check_positive(arch: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFError(f"metadata key '{arch}.{key}' must be a positive integer, got {value!r}")


def _vocab_size(md: dict[str, Any], arch: str) -> int:
    if f"{arch}.vocab_size" in md:
        return int(md[f"{arch}.vocab_size"])
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError("metadata has neither a vocab_size nor tokenizer.ggml.tokens")
    return len(tokens)
