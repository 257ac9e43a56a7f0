"""ModelConfig: the frozen description of a model's shape, built from GGUF metadata.

Supported architectures: the llama family (llama, mistral, qwen2 with q/k/v biases),
gemma3 (QK-norm, pre- and post-norms, gelu-tanh, embedding scale, sliding-window layers with
their own rope base, tied head) and the mixture-of-experts qwen3moe (QK-norm, softmax →
top-k → renormalized weights) and gpt-oss (biases, attention sinks, every other layer
sliding-window, top-k → softmax, clamped SwiGLU).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from loaders.gguf_arrays import GGUFArray
from loaders.gguf_check import check_block_count, check_tensors, check_vocab
from loaders.gguf_parse import TensorInfo
from quant.errors import GGUFError, UnsupportedError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
MOE = ("qwen3moe", "gpt-oss")
SUPPORTED = (*LLAMA_FAMILY, "gemma3", *MOE)


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
    activation: str  # "silu" | "gelu_tanh" | "swiglu_oai" (gpt-oss: clamped, α = 1.702)
    qk_norm: bool
    post_norms: bool  # post-attention and post-FFN norms (gemma)
    embed_scale: float  # token embeddings are multiplied by this (gemma: sqrt(n_embd))
    attn_scale: float  # softmax(q·k * attn_scale)
    tied_head: bool  # no output.weight: the head reuses token_embd
    attn_bias: bool  # q/k/v projections carry biases (qwen2)
    # mixture of experts (qwen3moe, gpt-oss); 0 experts: a dense feed-forward
    n_expert: int = 0
    n_expert_used: int = 0  # experts each token is routed to (top-k)
    n_ff_exp: int = 0  # an expert's feed-forward width
    expert_gating: str = "softmax"  # "softmax": softmax → top-k; "softmax_weight": top-k → softmax
    expert_norm: bool = False  # the top-k weights renormalized to sum to 1
    attn_sinks: bool = False  # a learned per-head logit in every softmax's denominator (gpt-oss)
    rope_scaling: str = "none"  # the file's rope.scaling.type ("yarn": gpt-oss; not applied)

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_metadata(
        cls, md: dict[str, Any], tensors: Collection[str] | Mapping[str, TensorInfo]
    ) -> ModelConfig:
        """The config of a model file, checked against its tensor table before anything is
        sized by it. `tensors`: the file's tensor names, or its name → TensorInfo mapping
        (`GGUFFile.tensors`, or its `.keys()`: a dict's keys view carries the dict), which
        also checks every tensor's shape against the metadata (loaders/gguf_check.py)."""
        arch = md.get("general.architecture")
        if not isinstance(arch, str) or arch not in SUPPORTED:
            raise UnsupportedError(
                f"unsupported architecture {_show(arch)} (supported: {', '.join(SUPPORTED)})"
            )
        infos = _infos(tensors)
        names = infos.keys() if infos is not None else tensors
        get = _Getter(md, arch)
        n_embd, n_head = get.integer("embedding_length"), get.integer("attention.head_count")
        n_head_kv = get.integer("attention.head_count_kv", n_head)
        n_layer = get.integer("block_count")
        check_block_count(arch, n_layer, names)  # before anything is built per layer
        if n_head % n_head_kv:
            raise GGUFError(
                f"metadata key '{arch}.attention.head_count' ({n_head}) is not a "
                f"multiple of '{arch}.attention.head_count_kv' ({n_head_kv})"
            )
        if "attention.key_length" not in get and n_embd % n_head:
            raise GGUFError(
                f"metadata key '{arch}.embedding_length' ({n_embd}) is not a multiple of "
                f"'{arch}.attention.head_count' ({n_head}) and there is no key_length"
            )
        head_dim = get.integer("attention.key_length", n_embd // n_head)
        head_dim_v = get.integer("attention.value_length", head_dim)
        moe = arch in MOE
        n_ff_exp = get.integer("expert_feed_forward_length") if moe else 0
        n_ff = get.integer("feed_forward_length", n_ff_exp or _Getter._missing)
        n_ctx_train = get.integer("context_length", 2048)
        vocab_size, n_tokens = _vocab_size(md, arch)
        check_vocab(arch, vocab_size, n_tokens)
        gemma, oss = arch == "gemma3", arch == "gpt-oss"
        swa = gemma or oss
        window = get.integer("attention.sliding_window", 0, positive=False) if swa else 0
        rope_base = get.number("rope.freq_base", 10000.0)
        scaling = get.text("rope.scaling.type", "none")
        factor = get.number("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
        config = cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=n_ff,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_ctx_train=n_ctx_train,
            vocab_size=vocab_size,
            rms_eps=get.number("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=rope_base,
            rope_base_swa=10000.0 if window and gemma else rope_base,
            rope_scale=factor,
            rope_neox=arch in ("qwen2", "gemma3", *MOE),
            sliding_window=window,
            # gemma3: five sliding-window layers, then one global layer, repeating;
            # gpt-oss: sliding-window and global layers alternate, layer 0 sliding
            swa_layers=tuple(
                bool(window) and (i % (2 if oss else 6)) < (1 if oss else 5) for i in range(n_layer)
            ),
            activation="gelu_tanh" if gemma else "swiglu_oai" if oss else "silu",
            qk_norm=gemma or arch == "qwen3moe",
            post_norms=gemma,
            embed_scale=math.sqrt(n_embd) if gemma else 1.0,
            attn_scale=1.0 / math.sqrt(head_dim),
            tied_head="output.weight" not in names,
            attn_bias="blk.0.attn_q.bias" in names,
            n_expert=get.integer("expert_count") if moe else 0,
            n_expert_used=get.integer("expert_used_count") if moe else 0,
            n_ff_exp=n_ff_exp,
            expert_gating="softmax_weight" if oss else "softmax",
            expert_norm=arch == "qwen3moe",
            attn_sinks=oss,
            rope_scaling=scaling,
        )
        if moe and config.n_expert_used > config.n_expert:
            raise GGUFError(
                f"metadata key '{arch}.expert_used_count' ({config.n_expert_used}) exceeds "
                f"'{arch}.expert_count' ({config.n_expert})"
            )
        if infos is not None:
            check_tensors(config, infos)
        return config


def _infos(tensors: Collection[str] | Mapping[str, Any]) -> Mapping[str, TensorInfo] | None:
    """The name → TensorInfo mapping behind `tensors`, when it has one."""
    mapping = tensors if isinstance(tensors, Mapping) else getattr(tensors, "mapping", None)
    if isinstance(mapping, Mapping) and all(isinstance(v, TensorInfo) for v in mapping.values()):
        return mapping
    return None


def _show(value: Any) -> str:
    """A short rendering of an offending metadata value and its type."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:60] + "..."
    return f"{text} ({_type_name(value)})"


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (GGUFArray, list)):
        return f"an array of {len(value)}"
    return type(value).__name__


class _Getter:
    """`{arch}.KEY` values, each checked to have the type the key needs."""

    _missing = object()

    def __init__(self, md: dict[str, Any], arch: str) -> None:
        self.md, self.arch = md, arch

    def __contains__(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.md

    def _get(self, key: str, default: Any) -> tuple[str, Any]:
        full = f"{self.arch}.{key}"
        value = self.md.get(full, default)
        if value is self._missing:
            raise GGUFError(f"metadata key '{full}' is missing; the file is incomplete")
        return full, value

    def _scalar(self, full: str, value: Any, kind: str) -> Any:
        """A per-layer array stands for its one value when every layer has the same."""
        if isinstance(value, (GGUFArray, list)) and value:
            first = value[0]
            if any(v != first for v in value):
                raise UnsupportedError(
                    f"metadata key '{full}' differs between layers, which tandem does not "
                    f"support (it must be {kind})"
                )
            return first
        return value

    def integer(self, key: str, default: Any = _missing, positive: bool = True) -> int:
        full, value = self._get(key, default)
        value = self._scalar(full, value, "a positive integer")
        if isinstance(value, bool) or not isinstance(value, int) or value < int(positive):
            what = "a positive integer" if positive else "a non-negative integer"
            raise GGUFError(f"metadata key '{full}' must be {what}, got {_show(value)}")
        return value

    def number(self, key: str, default: Any = _missing) -> float:
        full, value = self._get(key, default)
        value = self._scalar(full, value, "a finite number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GGUFError(f"metadata key '{full}' must be a number, got {_show(value)}")
        if not math.isfinite(value) or value <= 0:
            raise GGUFError(f"metadata key '{full}' must be a positive number, got {value!r}")
        return float(value)

    def text(self, key: str, default: Any = _missing) -> str:
        full, value = self._get(key, default)
        if not isinstance(value, str):
            raise GGUFError(f"metadata key '{full}' must be a string, got {_show(value)}")
        return value


def _vocab_size(md: dict[str, Any], arch: str) -> tuple[int, int | None]:
    """(the vocabulary size, the token list's length or None when there is none)."""
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, (GGUFArray, list)):
        raise GGUFError(
            f"metadata key 'tokenizer.ggml.tokens' must be an array, got {_show(tokens)}"
        )
    n_tokens = len(tokens) if tokens is not None else None
    key = f"{arch}.vocab_size"
    if key in md:
        value = md[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise GGUFError(f"metadata key '{key}' must be a positive integer, got {_show(value)}")
        return value, n_tokens
    if not n_tokens:
        raise GGUFError("metadata has neither a vocab_size nor tokenizer.ggml.tokens")
    return n_tokens, n_tokens
