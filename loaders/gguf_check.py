"""Plausibility of a model GGUF: its hyperparameters against its tensor table, before
anything is built per layer or per token.

A header can claim anything (`block_count = 2^31`, a head count that does not divide the
projections, 40 000 output rows for a 49 152-token vocabulary); the tensor table is bounded
by the file's bytes. So every size tandem allocates by is first matched against the tensors
that exist: the block count against the `blk.N.` tensors present, the vocabulary against
the token list and the embedding and output rows, and every tensor a layer needs against
the shape the metadata implies (what llama.cpp's llama-model.cpp asks of each tensor, in
GGUF order: ne0, the contiguous row length, first). Each problem is one line naming the
tensor or key, what the file holds and what was expected.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from quant.errors import GGUFError, UnsupportedError

if TYPE_CHECKING:
    from loaders.config import ModelConfig
    from loaders.gguf_parse import TensorInfo

MAX_VOCAB = 1 << 20  # 4x the largest real vocabulary (gemma3: 262 144)

# tensors that mean an architecture variant tandem does not run
_UNSUPPORTED_PARTS = {
    "ffn_gate_inp": "mixture-of-experts layers",
    "ffn_gate_exps": "mixture-of-experts layers",
    "ffn_up_exps": "mixture-of-experts layers",
}


def block_indices(names: Iterable[str]) -> set[int]:
    """The N of every `blk.N.` tensor name."""
    out: set[int] = set()
    for name in names:
        if name.startswith("blk."):
            number = name[4:].partition(".")[0]
            if number.isdecimal() and number.isascii():
                out.add(int(number))
    return out


def check_block_count(arch: str, n_layer: int, names: Collection[str]) -> None:
    """`{arch}.block_count` must be the number of blocks whose tensors the file holds."""
    key = f"metadata key '{arch}.block_count'"
    if n_layer > len(names):  # each block has several tensors: no need to look further
        raise GGUFError(
            f"{key} is {n_layer} but the file has only {len(names)} tensors; "
            "the block count is corrupt"
        )
    present = block_indices(names)
    beyond = sorted(i for i in present if i >= n_layer)
    if beyond:
        raise GGUFError(
            f"{key} is {n_layer} but the file has tensors for block {beyond[0]} "
            f"(blk.{beyond[0]}.*); expected blocks 0 to {n_layer - 1}"
        )
    if len(present) != n_layer:
        missing = min(set(range(n_layer)) - present)
        raise GGUFError(
            f"{key} is {n_layer} but the file has no tensors for block {missing} "
            f"(blk.{missing}.*; it holds {len(present)} blocks)"
        )


def check_vocab(arch: str, vocab_size: int, n_tokens: int | None) -> None:
    """The vocabulary size is sane and matches the token list."""
    if vocab_size > MAX_VOCAB:
        raise UnsupportedError(
            f"a vocabulary of {vocab_size} tokens exceeds tandem's limit of {MAX_VOCAB}"
        )
    if n_tokens is not None and n_tokens != vocab_size:
        raise GGUFError(
            f"metadata key '{arch}.vocab_size' is {vocab_size} but tokenizer.ggml.tokens "
            f"holds {n_tokens} tokens; expected them to be equal"
        )


def expected_shapes(c: ModelConfig, names: Collection[str]) -> dict[str, tuple[tuple, str]]:
    """Each tensor the model reads → (its GGUF shape, the metadata the shape comes from)."""
    if c.encoder:
        return encoder_shapes(c, names)
    a = c.arch
    emb = f"{a}.embedding_length={c.n_embd}"
    vocab = f"vocabulary size {c.vocab_size}"
    q_out, kv_k, kv_v = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
    heads_q = f"{a}.attention.head_count={c.n_head} x key_length {c.head_dim}"
    heads_k = f"{a}.attention.head_count_kv={c.n_head_kv} x key_length {c.head_dim}"
    heads_v = f"{a}.attention.head_count_kv={c.n_head_kv} x value_length {c.head_dim_v}"
    heads_o = f"{a}.attention.head_count={c.n_head} x value_length {c.head_dim_v}"
    ff = f"{a}.feed_forward_length={c.n_ff}"
    out: dict[str, tuple[tuple, str]] = {
        "token_embd.weight": ((c.n_embd, c.vocab_size), f"{emb}, {vocab}"),
        "output_norm.weight": ((c.n_embd,), emb),
    }
    if not c.tied_head:
        out["output.weight"] = ((c.n_embd, c.vocab_size), f"{emb}, {vocab}")
    for i in range(c.n_layer):
        p = f"blk.{i}."
        if c.recurrent_layers:  # qwen35: delta-net and gated-attention layers
            out |= {p + name: shape for name, shape in hybrid_layer_shapes(c, i).items()}
            continue
        layer: dict[str, tuple[tuple, str]] = {}
        if c.pre_norms:
            layer["attn_norm.weight"] = ((c.n_embd,), emb)
        if c.fused_qkv:
            layer["attn_qkv.weight"] = ((c.n_embd, q_out + kv_k + kv_v), f"{emb}, q+k+v heads")
        else:
            layer["attn_q.weight"] = ((c.n_embd, q_out), f"{emb}, {heads_q}")
            layer["attn_k.weight"] = ((c.n_embd, kv_k), f"{emb}, {heads_k}")
            layer["attn_v.weight"] = ((c.n_embd, kv_v), f"{emb}, {heads_v}")
        layer["attn_output.weight"] = ((c.n_head * c.head_dim_v, c.n_embd), f"{heads_o}, {emb}")
        if c.pre_norms:
            layer["ffn_norm.weight"] = ((c.n_embd,), emb)
        if c.fused_gate_up:
            layer["ffn_up.weight"] = ((c.n_embd, 2 * c.n_ff), f"{emb}, 2 x {ff}")
        else:
            layer["ffn_gate.weight"] = ((c.n_embd, c.n_ff), f"{emb}, {ff}")
            layer["ffn_up.weight"] = ((c.n_embd, c.n_ff), f"{emb}, {ff}")
        layer["ffn_down.weight"] = ((c.n_ff, c.n_embd), f"{ff}, {emb}")
        if c.qk_norm:
            full = c.qk_norm_full  # olmo2: over all heads at once
            layer["attn_q_norm.weight"] = ((q_out if full else c.head_dim,), heads_q)
            layer["attn_k_norm.weight"] = ((kv_k if full else c.head_dim,), heads_k)
        if c.post_norms:
            layer["post_attention_norm.weight"] = ((c.n_embd,), emb)
            layer["post_ffw_norm.weight"] = ((c.n_embd,), emb)
        if c.n_expert:
            _moe_shapes(c, layer)
        for name, expected in layer.items():
            out[p + name] = expected
        for x, size, why in (("q", q_out, heads_q), ("k", kv_k, heads_k), ("v", kv_v, heads_v)):
            if f"{p}attn_{x}.bias" in names:  # optional: read when present
                out[f"{p}attn_{x}.bias"] = ((size,), why)
    for i in range(c.n_layer, c.n_layer + c.n_layer_nextn):
        out |= {f"blk.{i}.{name}": shape for name, shape in nextn_shapes(c, i, names).items()}
    return out


def nextn_shapes(c: ModelConfig, i: int, names: Collection[str]) -> dict[str, tuple[tuple, str]]:
    """MTP block i (qwen35's load_block_mtp): a gated-attention layer as the decoder's (with
    its feed-forward, qwen35moe's experts), the projection of [embedding; hidden] (2E → E) and
    its two norms; its own embedding, head and head norm are optional (checked if present)."""
    a = c.arch
    emb = f"{a}.embedding_length={c.n_embd}"
    vocab = f"{emb}, vocabulary size {c.vocab_size}"
    out = hybrid_layer_shapes(c, i) | {
        "nextn.eh_proj.weight": ((2 * c.n_embd, c.n_embd), f"2 x {emb}, {emb}"),
        "nextn.enorm.weight": ((c.n_embd,), emb),
        "nextn.hnorm.weight": ((c.n_embd,), emb),
    }
    optional = {
        "nextn.embed_tokens.weight": ((c.n_embd, c.vocab_size), vocab),
        "nextn.shared_head_head.weight": ((c.n_embd, c.vocab_size), vocab),
        "nextn.shared_head_norm.weight": ((c.n_embd,), emb),
    }
    return out | {n: v for n, v in optional.items() if f"blk.{i}.{n}" in names}


def hybrid_layer_shapes(c: ModelConfig, i: int) -> dict[str, tuple[tuple, str]]:
    """Layer i of qwen35 / qwen35moe (llama.cpp's load_arch_tensors of both): a gated delta
    net, or (every full_attention_interval-th) attention whose q rows hold each head's query
    then its output gate; both with a post-attention norm and a SwiGLU feed-forward (qwen35moe:
    routed experts and a shared expert). i ≥ n_layer: an MTP block's attention layer."""
    a = c.arch
    emb = f"{a}.embedding_length={c.n_embd}"
    ff = f"{a}.feed_forward_length={c.n_ff}"
    layer: dict[str, tuple[tuple, str]] = {
        "attn_norm.weight": ((c.n_embd,), emb),
        "post_attention_norm.weight": ((c.n_embd,), emb),
        "ffn_gate.weight": ((c.n_embd, c.n_ff), f"{emb}, {ff}"),
        "ffn_up.weight": ((c.n_embd, c.n_ff), f"{emb}, {ff}"),
        "ffn_down.weight": ((c.n_ff, c.n_embd), f"{ff}, {emb}"),
    }
    if c.n_expert:  # qwen35moe: routed experts and a shared one
        _moe_shapes(c, layer)
        shared = f"{a}.expert_shared_feed_forward_length={c.n_ff_shared}"
        layer["ffn_gate_inp_shexp.weight"] = ((c.n_embd,), emb)
        layer["ffn_gate_shexp.weight"] = ((c.n_embd, c.n_ff_shared), f"{emb}, {shared}")
        layer["ffn_up_shexp.weight"] = ((c.n_embd, c.n_ff_shared), f"{emb}, {shared}")
        layer["ffn_down_shexp.weight"] = ((c.n_ff_shared, c.n_embd), f"{shared}, {emb}")
    if i >= c.n_layer or not c.recurrent_layers[i]:  # an MTP block is attention too
        heads = f"{a}.attention.head_count={c.n_head} x key_length {c.head_dim}"
        kv = f"{a}.attention.head_count_kv={c.n_head_kv} x key_length {c.head_dim}"
        d = f"{a}.attention.key_length={c.head_dim}"
        return layer | {
            "attn_q.weight": ((c.n_embd, 2 * c.n_head * c.head_dim), f"{emb}, 2 x {heads}"),
            "attn_k.weight": ((c.n_embd, c.kv_dim), f"{emb}, {kv}"),
            "attn_v.weight": ((c.n_embd, c.n_head_kv * c.head_dim_v), f"{emb}, {kv}"),
            "attn_output.weight": ((c.n_head * c.head_dim_v, c.n_embd), f"{heads}, {emb}"),
            "attn_q_norm.weight": ((c.head_dim,), d),
            "attn_k_norm.weight": ((c.head_dim,), d),
        }
    key_dim = c.ssm_k_heads * c.ssm_state
    conv = 2 * key_dim + c.ssm_inner
    mix = f"{a}.ssm: 2 x group_count x state_size + inner_size = {conv}"
    inner = f"{a}.ssm.inner_size={c.ssm_inner}"
    heads = f"{a}.ssm.time_step_rank={c.ssm_v_heads}"
    return layer | {
        "attn_qkv.weight": ((c.n_embd, conv), f"{emb}, {mix}"),
        "attn_gate.weight": ((c.n_embd, c.ssm_inner), f"{emb}, {inner}"),
        "ssm_conv1d.weight": ((c.ssm_conv, conv), f"{a}.ssm.conv_kernel={c.ssm_conv}, {mix}"),
        "ssm_dt.bias": ((c.ssm_v_heads,), heads),
        "ssm_a": ((c.ssm_v_heads,), heads),
        "ssm_beta.weight": ((c.n_embd, c.ssm_v_heads), f"{emb}, {heads}"),
        "ssm_alpha.weight": ((c.n_embd, c.ssm_v_heads), f"{emb}, {heads}"),
        "ssm_norm.weight": ((c.ssm_state,), f"{a}.ssm.state_size={c.ssm_state}"),
        "ssm_out.weight": ((c.ssm_inner, c.n_embd), f"{inner}, {emb}"),
    }


def _moe_shapes(c: ModelConfig, layer: dict[str, tuple[tuple, str]]) -> None:
    """A mixture-of-experts layer's feed-forward tensors in place of the dense ones."""
    for name in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"):
        del layer[name]
    a = c.arch
    emb = f"{a}.embedding_length={c.n_embd}"
    ex = f"{a}.expert_count={c.n_expert}"
    ff = f"{a}.expert_feed_forward_length={c.n_ff_exp}"
    layer["ffn_gate_inp.weight"] = ((c.n_embd, c.n_expert), f"{emb}, {ex}")
    layer["ffn_gate_exps.weight"] = ((c.n_embd, c.n_ff_exp, c.n_expert), f"{emb}, {ff}, {ex}")
    layer["ffn_up_exps.weight"] = ((c.n_embd, c.n_ff_exp, c.n_expert), f"{emb}, {ff}, {ex}")
    layer["ffn_down_exps.weight"] = ((c.n_ff_exp, c.n_embd, c.n_expert), f"{ff}, {emb}, {ex}")
    if c.arch == "gpt-oss":  # the norm before the experts is post_attention_norm
        layer["post_attention_norm.weight"] = layer.pop("ffn_norm.weight")
        heads = f"{a}.attention.head_count={c.n_head}"
        layer["attn_sinks.weight"] = ((c.n_head,), heads)
        layer["attn_output.bias"] = ((c.n_embd,), emb)
        layer["ffn_gate_inp.bias"] = ((c.n_expert,), ex)
        layer["ffn_gate_exps.bias"] = ((c.n_ff_exp, c.n_expert), f"{ff}, {ex}")
        layer["ffn_up_exps.bias"] = ((c.n_ff_exp, c.n_expert), f"{ff}, {ex}")
        layer["ffn_down_exps.bias"] = ((c.n_embd, c.n_expert), f"{emb}, {ex}")


def encoder_shapes(c: ModelConfig, names: Collection[str]) -> dict[str, tuple[tuple, str]]:
    """bert's tensors (llama.cpp's llama_model_bert::load_arch_tensors): learned positions,
    token types, LayerNorms with biases, q/k/v (or a fused attn_qkv) and a two-matrix FFN;
    the optional biases are checked where present."""
    a = c.arch
    emb = f"{a}.embedding_length={c.n_embd}"
    ff = f"{a}.feed_forward_length={c.n_ff}"
    if c.n_token_types == 0:
        raise GGUFError(
            f"a {a} model needs tokenizer.ggml.token_type_count (the rows of token_types); "
            "the file has none: convert it again"
        )
    out: dict[str, tuple[tuple, str]] = {
        "token_embd.weight": ((c.n_embd, c.vocab_size), f"{emb}, vocabulary size {c.vocab_size}"),
        "position_embd.weight": ((c.n_embd, c.n_ctx_train), f"{emb}, {a}.context_length"),
        "token_embd_norm.weight": ((c.n_embd,), emb),
        "token_embd_norm.bias": ((c.n_embd,), emb),
    }
    optional: dict[str, tuple[tuple, str]] = {
        "token_types.weight": ((c.n_embd, c.n_token_types), f"{emb}, token_type_count"),
    }
    kv = c.n_head_kv * c.head_dim
    for i in range(c.n_layer):
        p = f"blk.{i}."
        if c.fused_qkv:
            out[p + "attn_qkv.weight"] = ((c.n_embd, c.n_embd + 2 * kv), f"{emb}, q+k+v heads")
            optional[p + "attn_qkv.bias"] = ((c.n_embd + 2 * kv,), "q+k+v heads")
        else:
            for x, size in (("q", c.n_embd), ("k", kv), ("v", kv)):
                out[p + f"attn_{x}.weight"] = ((c.n_embd, size), f"{emb}, heads")
                optional[p + f"attn_{x}.bias"] = ((size,), "heads")
        out[p + "attn_output.weight"] = ((c.n_embd, c.n_embd), emb)
        optional[p + "attn_output.bias"] = ((c.n_embd,), emb)
        out[p + "ffn_up.weight"] = ((c.n_embd, c.n_ff), f"{emb}, {ff}")
        optional[p + "ffn_up.bias"] = ((c.n_ff,), ff)
        out[p + "ffn_down.weight"] = ((c.n_ff, c.n_embd), f"{ff}, {emb}")
        optional[p + "ffn_down.bias"] = ((c.n_embd,), emb)
        for norm in ("attn_output_norm", "layer_output_norm"):
            out[p + norm + ".weight"] = ((c.n_embd,), emb)
            out[p + norm + ".bias"] = ((c.n_embd,), emb)
    out.update({n: v for n, v in optional.items() if n in names})
    return out


def _trim(shape: Iterable[int]) -> tuple[int, ...]:
    """A shape without trailing 1s: ggml pads every shape to 4 dims with 1s."""
    dims = list(shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def check_tensors(c: ModelConfig, tensors: Mapping[str, TensorInfo]) -> None:
    """Every tensor the model reads is present with the shape its metadata implies."""
    for name in tensors:
        part = name.split(".")[2] if name.startswith("blk.") and name.count(".") >= 2 else ""
        if part in _UNSUPPORTED_PARTS and not (c.n_expert and part.startswith("ffn_")):
            raise UnsupportedError(
                f"tensor '{name}': {_UNSUPPORTED_PARTS[part]} are not supported by tandem "
                f"for {c.arch}"
            )
    for name, (shape, why) in expected_shapes(c, tensors.keys()).items():
        info = tensors.get(name)
        if info is None:
            raise GGUFError(
                f"tensor '{name}' is missing; a {c.arch} model with {c.n_layer} blocks needs it"
            )
        if _trim(info.shape) != _trim(shape):
            raise GGUFError(
                f"tensor '{name}' has shape {list(info.shape)} but {list(shape)} was "
                f"expected from the metadata ({why})"
            )
