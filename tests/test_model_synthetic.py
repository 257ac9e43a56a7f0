"""The forward pass on tiny synthetic GGUFs (written with gguf.GGUFWriter) against a plain
torch transformer written here from the architecture's definition: covers the llama-family
paths the real models do not (qwen2's q/k/v biases and NEOX rope, an untied head)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_model import KVCache, forward

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.models import build_model

E, H, HKV, D, FF, V, LAYERS = 64, 4, 2, 16, 96, 50, 2


def make_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)

    def rnd(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (g.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "token_embd.weight": rnd(V, E, scale=1.0),
        "output_norm.weight": 1 + rnd(E),
        "output.weight": rnd(V, E),
    }
    for i in range(LAYERS):
        p = f"blk.{i}."
        w |= {
            p + "attn_norm.weight": 1 + rnd(E),
            p + "ffn_norm.weight": 1 + rnd(E),
            p + "attn_q.weight": rnd(H * D, E),
            p + "attn_k.weight": rnd(HKV * D, E),
            p + "attn_v.weight": rnd(HKV * D, E),
            p + "attn_output.weight": rnd(E, H * D),
            p + "ffn_gate.weight": rnd(FF, E),
            p + "ffn_up.weight": rnd(FF, E),
            p + "ffn_down.weight": rnd(E, FF),
        }
        if arch == "qwen2":
            w |= {
                p + "attn_q.bias": rnd(H * D),
                p + "attn_k.bias": rnd(HKV * D),
                p + "attn_v.bias": rnd(HKV * D),
            }
    return w


def write_gguf(path, arch: str, weights: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(E)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(H)
    writer.add_head_count_kv(HKV)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(V)
    for name, array in weights.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_logits(w: dict[str, np.ndarray], tokens: list[int], neox: bool) -> torch.Tensor:
    """A plain transformer: RMSNorm, GQA causal attention with RoPE, SwiGLU, untied head."""
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    n = len(tokens)

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight

    def rope(x):  # (n, heads, D)
        pos = torch.arange(n, dtype=torch.float64)[:, None]
        ang = pos * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        c, s = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]
        a, b = (x[..., : D // 2], x[..., D // 2 :]) if neox else (x[..., 0::2], x[..., 1::2])
        ra, rb = a * c - b * s, a * s + b * c
        return torch.cat((ra, rb), -1) if neox else torch.stack((ra, rb), -1).flatten(-2)

    x = t["token_embd.weight"][tokens]
    causal = torch.ones(n, n).tril().bool()
    for i in range(LAYERS):
        p = f"blk.{i}."
        h = norm(x, t[p + "attn_norm.weight"])
        proj = {k: h @ t[p + f"attn_{k}.weight"].T + t.get(p + f"attn_{k}.bias", 0) for k in "qkv"}
        q = rope(proj["q"].view(n, H, D))
        k = rope(proj["k"].view(n, HKV, D)).repeat_interleave(H // HKV, 1)
        v = proj["v"].view(n, HKV, D).repeat_interleave(H // HKV, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
        att = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, -1e30).softmax(-1), v)
        x = x + att.reshape(n, H * D) @ t[p + "attn_output.weight"].T
        h = norm(x, t[p + "ffn_norm.weight"])
        gate, up = h @ t[p + "ffn_gate.weight"].T, h @ t[p + "ffn_up.weight"].T
        x = x + (F.silu(gate) * up) @ t[p + "ffn_down.weight"].T
    return norm(x, t["output_norm.weight"]) @ t["output.weight"].T


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forward_matches_plain_transformer(tmp_path, arch):
    weights = make_weights(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, weights)
    gguf_file = GGUFFile(path)
    config = ModelConfig.from_metadata(gguf_file.metadata, gguf_file.tensors.keys())
    assert config.attn_bias == (arch == "qwen2") and config.rope_neox == (arch == "qwen2")
    assert not config.tied_head
    model = build_model(gguf_file, config)
    tokens = [3, 17, 42, 8, 29, 11]
    ref = reference_logits(weights, tokens, neox=config.rope_neox)
    with torch.inference_mode():
        cache = KVCache(config, 32, dtype=torch.float32)
        whole = forward(model, torch.tensor(tokens), 0, cache, all_logits=True)
        # the same sequence fed as a 4-token prefill and then one token at a time
        cache = KVCache(config, 32, dtype=torch.float32)
        steps = [forward(model, torch.tensor(tokens[:4]), 0, cache, all_logits=True)]
        steps += [
            forward(model, torch.tensor([tok]), pos, cache)
            for pos, tok in enumerate(tokens[4:], start=4)
        ]
    # float32 end to end; only summation order differs from the reference
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps), ref, rtol=1e-4, atol=1e-4)
