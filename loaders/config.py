"""ModelConfig: the frozen description of a model's shape, built from GGUF metadata.

Supported architectures (their layer math: runtime/models/, one file each): the llama family
(llama incl. Llama 3.x `rope_freqs`, mistral, qwen2 with q/k/v biases, mistral3 with YaRN and
attention temperature, smollm3 with NoPE layers, granite with its multipliers), qwen3
(per-head QK-norm), olmo2 (post-norms only, QK-norm over all heads), phi3 (fused QKV and
gate-up, LongRoPE factors), gemma2 (soft-capping, alternating sliding window), gemma3, and
the mixture-of-experts qwen3moe (QK-norm, softmax → top-k → renormalized weights) and gpt-oss
(biases, attention sinks, every other layer sliding-window, top-k → softmax, clamped SwiGLU),
the hybrid qwen35 and qwen35moe (gated delta nets between gated attention layers: ssm.*
sizes, partial interleaved M-RoPE; qwen35moe's feed-forward: routed experts as qwen3moe's
and a sigmoid-gated shared expert), and the encoder bert
(learned positions, LayerNorm post-norms, non-causal attention; embeddings only).
The scalars here are read as llama.cpp's loader reads them (src/llama-model.cpp and
src/models/ARCH.cpp): a key's default is llama.cpp's.
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

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "mistral3", "smollm3", "granite")
MOE = ("qwen3moe", "gpt-oss", "qwen35moe")
HYBRID = ("qwen35", "qwen35moe")  # linear-attention (gated delta net) layers between attention ones
SUPPORTED = (*LLAMA_FAMILY, "qwen3", "olmo2", "phi3", "gemma2", "gemma3", *MOE, *HYBRID, "bert")
ENCODERS = ("bert",)  # no LM head: they make embeddings, never generate
# ggml's NEOX rope layout (halves rotate together); the others rotate adjacent pairs
_NEOX = ("qwen2", "qwen3", "olmo2", "phi3", "gemma2", "gemma3", *MOE, *HYBRID)
_GEMMA = ("gemma2", "gemma3")
ROPE_SCALINGS = ("none", "linear", "yarn", "longrope")


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
    rope_scale: float  # rope scaling factor: positions interpolate by 1/factor (1.0: none)
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
    # ---- what the newer architectures add (defaults: none of it) -----------------------
    rope_scaling: str = "none"  # ROPE_SCALINGS: how rope_scale applies (yarn: ramped)
    rope_orig_ctx: int = 0  # the context the rope was trained at (YaRN, LongRoPE)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_log_mul: float = 0.0  # YaRN's mscale_all_dims (0: none)
    rope_attn_factor: float = 1.0  # cos/sin magnitude (LongRoPE's attention factor)
    rope_layers: tuple[bool, ...] = ()  # layers that rotate q/k (smollm3: 3 in 4); () = all
    qk_norm_full: bool = False  # QK-norm over all heads at once (olmo2) not per head
    pre_norms: bool = True  # attn_norm/ffn_norm before each block (olmo2: none)
    fused_qkv: bool = False  # one attn_qkv tensor (phi3)
    fused_gate_up: bool = False  # ffn_up holds gate then up, no ffn_gate (phi3)
    attn_softcap: float = 0.0  # scores → cap·tanh(scores / cap) (gemma2; 0: none)
    final_softcap: float = 0.0  # logits → cap·tanh(logits / cap) (gemma2; 0: none)
    logit_scale: float = 1.0  # logits are divided by this (granite)
    residual_scale: float = 1.0  # each block's output is multiplied by this (granite)
    attn_temp_scale: float = 0.0  # q *= 1 + s·log(⌊(p + 1) / floor⌋ + 1) (mistral3; 0: none)
    attn_temp_floor: int = 0
    # ---- encoders (bert) ----------------------------------------------------------------
    layer_norm_eps: float = 1e-12  # LayerNorm's epsilon ({arch}.attention.layer_norm_epsilon)
    causal: bool = True  # attention sees only earlier tokens ({arch}.attention.causal)
    n_token_types: int = 0  # rows of token_types (tokenizer.ggml.token_type_count)
    # ---- mixture of experts (qwen3moe, gpt-oss); 0 experts: a dense feed-forward
    n_expert: int = 0
    n_expert_used: int = 0  # experts each token is routed to (top-k)
    n_ff_exp: int = 0  # an expert's feed-forward width
    expert_gating: str = "softmax"  # "softmax": softmax → top-k; "softmax_weight": top-k → softmax
    expert_norm: bool = False  # the top-k weights renormalized to sum to 1
    attn_sinks: bool = False  # a learned per-head logit in every softmax's denominator (gpt-oss)
    n_ff_shared: int = 0  # the shared expert's feed-forward width (qwen35moe; 0: none)
    # ---- hybrid linear attention (qwen35): see runtime/models/qwen35.py ------------------
    rope_dim: int = 0  # dimensions of a head that rotate (rope.dimension_count; 0: all)
    rope_sections: tuple[int, ...] = ()  # M-RoPE's pairs per position section (t, h, w, e)
    recurrent_layers: tuple[bool, ...] = ()  # layers that are gated delta nets; () = none
    ssm_conv: int = 0  # the causal conv1d's kernel width (ssm.conv_kernel)
    ssm_state: int = 0  # a delta-net head's size (ssm.state_size)
    ssm_k_heads: int = 0  # q/k heads of a delta net (ssm.group_count)
    ssm_v_heads: int = 0  # v heads of a delta net (ssm.time_step_rank)
    ssm_inner: int = 0  # v heads × their size (ssm.inner_size)
    # multi-token-prediction blocks after the n_layer decoder layers (nextn_predict_layers:
    # blk.{n_layer}… of block_count): shape-checked, never loaded or run, not planned
    n_layer_nextn: int = 0

    @property
    def encoder(self) -> bool:
        return self.arch in ENCODERS

    def has_rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]

    @property
    def recurrent(self) -> bool:
        """Some layers keep per-sequence recurrent state (a conv window, a delta-net matrix)."""
        return any(self.recurrent_layers)

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
        n_blocks = get.integer("block_count")
        check_block_count(arch, n_blocks, names)  # before anything is built per layer
        n_nextn = _nextn_layers(get, n_blocks) if arch in HYBRID else 0
        n_layer = n_blocks - n_nextn  # the decoder layers; the MTP blocks follow them
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
        gemma, oss = arch in _GEMMA, arch == "gpt-oss"
        window = _window(arch, get, n_layer)
        rope_base = get.number("rope.freq_base", 10000.0)
        scaling = get.text("rope.scaling.type", "linear")  # llama.cpp's default
        if scaling not in ROPE_SCALINGS:
            raise UnsupportedError(
                f"metadata key '{arch}.rope.scaling.type' is {scaling!r}; tandem supports "
                f"{', '.join(ROPE_SCALINGS)}"
            )
        factor = get.number("rope.scaling.factor", 1.0) if scaling != "none" else 1.0
        # qwen35's attn_qkv is a delta net's q/k/v mix, not a fused attention projection
        fused_qkv = "blk.0.attn_qkv.weight" in names and arch not in HYBRID
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
            rope_base_swa=_rope_base_swa(arch, get, rope_base) if window else rope_base,
            rope_scale=factor,
            rope_neox=arch in _NEOX,
            sliding_window=window,
            swa_layers=_swa_layers(arch, n_layer, window),
            activation="gelu_tanh" if gemma else "swiglu_oai" if oss else "silu",
            qk_norm=arch in ("gemma3", "qwen3", "olmo2", "qwen3moe", *HYBRID),
            post_norms=arch in (*_GEMMA, "olmo2"),
            embed_scale=_embed_scale(arch, get, n_embd),
            attn_scale=_attn_scale(arch, get, n_embd, n_head, head_dim, n_layer),
            tied_head="output.weight" not in names,
            attn_bias="blk.0.attn_q.bias" in names,
            rope_scaling=scaling if factor != 1.0 or scaling == "longrope" else "none",
            rope_orig_ctx=get.integer("rope.scaling.original_context_length", n_ctx_train),
            yarn_beta_fast=get.number("rope.scaling.yarn_beta_fast", 32.0),
            yarn_beta_slow=get.number("rope.scaling.yarn_beta_slow", 1.0),
            yarn_log_mul=get.number("rope.scaling.yarn_log_multiplier", 0.0, zero=True),
            rope_attn_factor=get.number("rope.scaling.attn_factor", 1.0),
            rope_layers=_rope_layers(arch, get, n_layer),
            qk_norm_full=arch == "olmo2",
            pre_norms=arch != "olmo2",
            fused_qkv=fused_qkv,
            fused_gate_up=arch == "phi3" and "blk.0.ffn_gate.weight" not in names,
            attn_softcap=get.number("attn_logit_softcapping", 50.0) if arch == "gemma2" else 0.0,
            final_softcap=get.number("final_logit_softcapping", 30.0) if arch == "gemma2" else 0.0,
            logit_scale=get.number("logit_scale", 1.0) if arch == "granite" else 1.0,
            residual_scale=get.number("residual_scale", 1.0) if arch == "granite" else 1.0,
            attn_temp_scale=get.number("attention.temperature_scale", 0.0, zero=True)
            if arch == "mistral3"
            else 0.0,
            attn_temp_floor=get.integer("rope.scaling.original_context_length", n_ctx_train),
            n_expert=get.integer("expert_count") if moe else 0,
            n_expert_used=get.integer("expert_used_count") if moe else 0,
            n_ff_exp=n_ff_exp,
            expert_gating="softmax_weight" if oss else "softmax",
            expert_norm=arch in ("qwen3moe", "qwen35moe"),
            n_ff_shared=get.integer("expert_shared_feed_forward_length", n_ff)
            if arch == "qwen35moe"
            else 0,
            attn_sinks=oss,
            **(_encoder_fields(get, md) if arch in ENCODERS else {}),
            **(_hybrid_fields(get, n_layer, head_dim) if arch in HYBRID else {}),
            n_layer_nextn=n_nextn,
        )
        if moe and config.n_expert_used > config.n_expert:
            raise GGUFError(
                f"metadata key '{arch}.expert_used_count' ({config.n_expert_used}) exceeds "
                f"'{arch}.expert_count' ({config.n_expert})"
            )
        if infos is not None:
            check_tensors(config, infos)
        return config


def _encoder_fields(get: _Getter, md: dict[str, Any]) -> dict[str, Any]:
    """bert's scalars, as llama.cpp reads them: the LayerNorm epsilon is required, causal
    attention defaults to true (converted BERTs say false), token types to none."""
    causal = md.get(f"{get.arch}.attention.causal", True)
    if not isinstance(causal, bool):
        raise GGUFError(
            f"metadata key '{get.arch}.attention.causal' must be a bool, got {_show(causal)}"
        )
    types = md.get("tokenizer.ggml.token_type_count", 0)
    if isinstance(types, bool) or not isinstance(types, int) or types < 0:
        raise GGUFError(
            "metadata key 'tokenizer.ggml.token_type_count' must be a non-negative integer, "
            f"got {_show(types)}"
        )
    return {
        "layer_norm_eps": get.number("attention.layer_norm_epsilon"),
        "causal": causal,
        "n_token_types": types,
    }


def _hybrid_fields(get: _Getter, n_layer: int, head_dim: int) -> dict[str, Any]:
    """qwen35's scalars, as llama.cpp reads them: the delta nets' sizes (ssm.*, all
    required), which layers they are (every full_attention_interval-th layer, default 4, is
    attention), the rotated part of a head and its M-RoPE sections."""
    interval = get.integer("full_attention_interval", 4)
    if "attention.recurrent_layers" in get:
        raise UnsupportedError(
            f"{get.arch} with an explicit attention.recurrent_layers pattern is not supported "
            "yet (only full_attention_interval)"
        )
    rope_dim = get.integer("rope.dimension_count", head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise GGUFError(
            f"metadata key '{get.arch}.rope.dimension_count' ({rope_dim}) must be even and at "
            f"most the head size ({head_dim})"
        )
    fields = {
        "ssm_conv": get.integer("ssm.conv_kernel"),
        "ssm_inner": get.integer("ssm.inner_size"),
        "ssm_state": get.integer("ssm.state_size"),
        "ssm_v_heads": get.integer("ssm.time_step_rank"),
        "ssm_k_heads": get.integer("ssm.group_count"),
        "rope_dim": rope_dim,
        "rope_sections": _sections(get, rope_dim),
        "recurrent_layers": tuple((i + 1) % interval != 0 for i in range(n_layer)),
    }
    _check_delta_net(get.arch, fields)
    return fields


def _nextn_layers(get: _Getter, n_blocks: int) -> int:
    """How many of the block_count blocks are multi-token-prediction (MTP) blocks, the last
    ones (nextn_predict_layers, default 0, as llama.cpp reads it). They are a draft head for
    speculative decoding, which tandem does not do: their tensors are checked, never run."""
    n = get.integer("nextn_predict_layers", 0, positive=False)
    if n >= n_blocks:
        raise UnsupportedError(
            f"metadata key '{get.arch}.nextn_predict_layers' ({n}) leaves none of the "
            f"{n_blocks} blocks (block_count) as decoder layers: an MTP-only file (llama.cpp's "
            "convert --mtp-only) is a draft head, not a model; load the full model"
        )
    return n


def _sections(get: _Getter, rope_dim: int) -> tuple[int, ...]:
    """rope.dimension_sections: four non-negative pair counts summing to at most D_rot/2."""
    full = f"{get.arch}.rope.dimension_sections"
    value = get.md.get(full)
    if not isinstance(value, (GGUFArray, list)) or not 1 <= len(value) <= 4:
        raise GGUFError(f"metadata key '{full}' must be an array of 4 integers, got {_show(value)}")
    sections = tuple(value) + (0,) * (4 - len(value))
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in sections):
        raise GGUFError(f"metadata key '{full}' must hold non-negative integers")
    if not 0 < sum(sections) <= rope_dim // 2:
        raise GGUFError(
            f"metadata key '{full}' sums to {sum(sections)} pairs; the rope rotates "
            f"{rope_dim // 2} (rope.dimension_count / 2)"
        )
    return sections


def _check_delta_net(arch: str, f: dict[str, Any]) -> None:
    """The delta net's head counts must divide: v heads × state = inner size, a whole number
    of v heads per q/k head (llama.cpp asserts both)."""
    if f["ssm_inner"] != f["ssm_v_heads"] * f["ssm_state"]:
        raise GGUFError(
            f"metadata key '{arch}.ssm.inner_size' ({f['ssm_inner']}) is not "
            f"ssm.time_step_rank ({f['ssm_v_heads']}) x ssm.state_size ({f['ssm_state']})"
        )
    if f["ssm_v_heads"] % f["ssm_k_heads"]:
        raise GGUFError(
            f"metadata key '{arch}.ssm.time_step_rank' ({f['ssm_v_heads']}) is not a multiple "
            f"of '{arch}.ssm.group_count' ({f['ssm_k_heads']})"
        )


def _window(arch: str, get: _Getter, n_layer: int) -> int:
    """The sliding window of the sliding-window layers (0: none). phi3's is read and dropped
    by llama.cpp (its SWA is disabled there); olmo2's (olmo3) is not supported."""
    if arch == "gemma2":
        return get.integer("attention.sliding_window", 4096, positive=False)
    if arch in ("gemma3", "gpt-oss"):
        return get.integer("attention.sliding_window", 0, positive=False)
    if arch == "olmo2" and get.integer("attention.sliding_window", 0, positive=False):
        raise UnsupportedError("olmo2 with sliding-window layers (OLMo 3) is not supported")
    return 0


def _swa_layers(arch: str, n_layer: int, window: int) -> tuple[bool, ...]:
    """Which layers use the window: gemma2 and gpt-oss every other one from the first
    (llama.cpp's pattern 2), gemma3 five in six."""
    period = {"gemma2": 2, "gpt-oss": 2, "gemma3": 6}.get(arch, 0)
    return tuple(bool(window) and i % period < period - 1 for i in range(n_layer))


def _rope_base_swa(arch: str, get: _Getter, rope_base: float) -> float:
    default = 10000.0 if arch == "gemma3" else rope_base
    read = arch in ("gemma2", "gpt-oss")  # the archs whose loaders read the key (llama.cpp)
    return get.number("rope.freq_base_swa", default) if read else default


def _rope_layers(arch: str, get: _Getter, n_layer: int) -> tuple[bool, ...]:
    """smollm3: every 4th layer has no rope (NoPE); granite: rope only where
    rope.scaling.finetuned (default true) says so."""
    if arch == "smollm3":
        return tuple((i + 1) % 4 != 0 for i in range(n_layer))
    if arch == "granite":
        finetuned = get.md.get(f"{arch}.rope.scaling.finetuned", True)
        if not isinstance(finetuned, bool):
            raise GGUFError(
                f"metadata key '{arch}.rope.scaling.finetuned' must be a bool, got "
                f"{_show(finetuned)}"
            )
        return (finetuned,) * n_layer
    return ()


def _embed_scale(arch: str, get: _Getter, n_embd: int) -> float:
    if arch in _GEMMA:
        return math.sqrt(n_embd)
    if arch == "granite":
        return get.number("embedding_scale", 0.0, zero=True) or 1.0
    return 1.0


def _attn_scale(
    arch: str, get: _Getter, n_embd: int, n_head: int, head_dim: int, n_layer: int
) -> float:
    """The factor of q·k: 1/√head_dim unless granite's attention.scale says; gemma2 27B
    (46 layers) scales by its n_embd / n_head instead (llama.cpp reads no other key)."""
    if arch == "gemma2" and n_layer == 46:
        return 1.0 / math.sqrt(n_embd / n_head)
    if arch == "granite":
        scale = get.number("attention.scale", 0.0, zero=True)
        if scale:
            return scale
    return 1.0 / math.sqrt(head_dim)


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

    def number(self, key: str, default: Any = _missing, zero: bool = False) -> float:
        """A positive finite number (or zero, where `zero`: the key's "none")."""
        full, value = self._get(key, default)
        value = self._scalar(full, value, "a finite number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GGUFError(f"metadata key '{full}' must be a number, got {_show(value)}")
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            what = "a non-negative" if zero else "a positive"
            raise GGUFError(f"metadata key '{full}' must be {what} number, got {value!r}")
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
