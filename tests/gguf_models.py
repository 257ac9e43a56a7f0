"""Tiny model GGUFs for the plausibility tests: a 2-block llama (or gemma3) with random F32
weights whose metadata keys and tensors a test can override, drop or reshape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

VT = gguf.GGUFValueType
E, FF, H, HKV, HD = 32, 64, 2, 1, 16  # embedding, FFN, heads, KV heads, head size
TOKENS = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e"]
DROP = object()  # an override value that removes the key or tensor


def metadata(arch: str = "llama", n_layer: int = 2) -> dict[str, tuple[Any, VT]]:
    md = {
        "general.architecture": (arch, VT.STRING),
        f"{arch}.block_count": (n_layer, VT.UINT32),
        f"{arch}.context_length": (256, VT.UINT32),
        f"{arch}.embedding_length": (E, VT.UINT32),
        f"{arch}.feed_forward_length": (FF, VT.UINT32),
        f"{arch}.attention.head_count": (H, VT.UINT32),
        f"{arch}.attention.head_count_kv": (HKV, VT.UINT32),
        f"{arch}.attention.key_length": (HD, VT.UINT32),
        f"{arch}.attention.value_length": (HD, VT.UINT32),
        f"{arch}.rope.freq_base": (10000.0, VT.FLOAT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-6, VT.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", VT.STRING),
        "tokenizer.ggml.pre": ("gpt-2", VT.STRING),
        "tokenizer.ggml.tokens": (TOKENS, VT.ARRAY),
        "tokenizer.ggml.merges": (["a b"], VT.ARRAY),
        "tokenizer.ggml.token_type": ([3, 3, 3] + [1] * (len(TOKENS) - 3), VT.ARRAY),
        "tokenizer.ggml.eos_token_id": (2, VT.UINT32),
        "tokenizer.ggml.add_bos_token": (False, VT.BOOL),
    }
    return md


def tensors(arch: str = "llama", n_layer: int = 2, vocab: int = len(TOKENS)) -> dict:
    """Tensor name → numpy shape (rows, row length): GGUF's shape reversed."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, E),
        "output_norm.weight": (E,),
        "output.weight": (vocab, E),
    }
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (E,),
            p + "attn_q.weight": (H * HD, E),
            p + "attn_k.weight": (HKV * HD, E),
            p + "attn_v.weight": (HKV * HD, E),
            p + "attn_output.weight": (E, H * HD),
            p + "ffn_norm.weight": (E,),
            p + "ffn_gate.weight": (FF, E),
            p + "ffn_up.weight": (FF, E),
            p + "ffn_down.weight": (E, FF),
        }
        if arch == "gemma3":
            shapes |= {
                p + "attn_q_norm.weight": (HD,),
                p + "attn_k_norm.weight": (HD,),
                p + "post_attention_norm.weight": (E,),
                p + "post_ffw_norm.weight": (E,),
            }
    return shapes


def write_model(
    path: Path,
    md: dict[str, Any] | None = None,
    shapes: dict[str, Any] | None = None,
    arch: str = "llama",
    n_layer: int = 2,
    seed: int = 0,
) -> Path:
    """The tiny model with `md` (key → (value, type) or DROP) and `shapes` (tensor → numpy
    shape or DROP) applied over the defaults."""
    keys = metadata(arch, n_layer) | (md or {})
    layout = tensors(arch, n_layer) | (shapes or {})
    writer = gguf.GGUFWriter(str(path), arch)
    writer.kv_data[0].pop("general.architecture", None)  # written below, possibly overridden
    for key, entry in keys.items():
        if entry is DROP:
            continue
        value, vtype = entry
        if vtype == VT.ARRAY:
            first = value[0]
            sub = VT.STRING if isinstance(first, str) else VT.INT32
            sub = VT.FLOAT32 if isinstance(first, float) else sub
            writer.add_key_value(key, value, vtype, sub_type=sub)
        else:
            writer.add_key_value(key, value, vtype)
    g = np.random.default_rng(seed)
    for name, shape in layout.items():
        if shape is DROP:
            continue
        array = (g.standard_normal(shape) * 0.2).astype(np.float32)
        if name.endswith("norm.weight"):
            array += 1
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
