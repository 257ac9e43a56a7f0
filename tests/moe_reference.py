"""Tiny qwen3moe and gpt-oss GGUFs (gguf.GGUFWriter) and a plain float64 torch transformer
written here from the architectures' definitions (llama.cpp's src/models/qwen3moe.cpp and
openai-moe.cpp, build_moe_ffn in llama-graph.cpp), for tests/test_moe_models.py."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

E, H, HKV, D, V, LAYERS = 64, 4, 2, 16, 50, 2
N_EXPERT, N_USED, FF_EXP, WINDOW = 8, 3, 32, 3


def make_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)

    def rnd(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (g.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "token_embd.weight": rnd(V, E, scale=1.0),
        "output_norm.weight": 1 + rnd(E),
        "output.weight": rnd(V, E),
    }
    ffn_norm = "post_attention_norm.weight" if arch == "gpt-oss" else "ffn_norm.weight"
    for i in range(LAYERS):
        p = f"blk.{i}."
        w |= {
            p + "attn_norm.weight": 1 + rnd(E),
            p + ffn_norm: 1 + rnd(E),
            p + "attn_q.weight": rnd(H * D, E),
            p + "attn_k.weight": rnd(HKV * D, E),
            p + "attn_v.weight": rnd(HKV * D, E),
            p + "attn_output.weight": rnd(E, H * D),
            p + "ffn_gate_inp.weight": rnd(N_EXPERT, E, scale=1.0),
            p + "ffn_gate_exps.weight": rnd(N_EXPERT, FF_EXP, E),
            p + "ffn_up_exps.weight": rnd(N_EXPERT, FF_EXP, E),
            p + "ffn_down_exps.weight": rnd(N_EXPERT, E, FF_EXP),
        }
        if arch == "qwen3moe":
            w |= {p + "attn_q_norm.weight": 1 + rnd(D), p + "attn_k_norm.weight": 1 + rnd(D)}
        else:
            w |= {
                p + "attn_q.bias": rnd(H * D),
                p + "attn_k.bias": rnd(HKV * D),
                p + "attn_v.bias": rnd(HKV * D),
                p + "attn_output.bias": rnd(E),
                p + "attn_sinks.weight": rnd(H, scale=1.0),
                p + "ffn_gate_inp.bias": rnd(N_EXPERT),
                p + "ffn_gate_exps.bias": rnd(N_EXPERT, FF_EXP),
                p + "ffn_up_exps.bias": rnd(N_EXPERT, FF_EXP),
                p + "ffn_down_exps.bias": rnd(N_EXPERT, E),
            }
    return w


def quantize_experts(w: dict[str, np.ndarray], qtype: T) -> dict[str, np.ndarray]:
    """The expert weights rounded through `qtype` (what the file will hold), in float32."""
    out = dict(w)
    for name, array in w.items():
        if "_exps.weight" in name:
            rows = array.reshape(-1, array.shape[-1])
            out[name] = quants.dequantize(quants.quantize(rows, qtype), qtype).reshape(array.shape)
    return out


def write_gguf(path, arch: str, weights: dict[str, np.ndarray], expert_type: T = T.F32) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(E)
    writer.add_feed_forward_length(FF_EXP)
    writer.add_expert_feed_forward_length(FF_EXP)
    writer.add_expert_count(N_EXPERT)
    writer.add_expert_used_count(N_USED)
    writer.add_head_count(H)
    writer.add_head_count_kv(HKV)
    writer.add_key_length(D)
    writer.add_value_length(D)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(V)
    if arch == "gpt-oss":
        writer.add_sliding_window(WINDOW)
    for name, array in weights.items():
        if "_exps.weight" in name and expert_type != T.F32:
            rows = array.reshape(-1, array.shape[-1])
            packed = quants.quantize(rows, expert_type)
            writer.add_tensor(name, packed.reshape(*array.shape[:-1], -1), raw_dtype=expert_type)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _norm(x, weight):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight


def _rope(x, n):  # (n, heads, D), NEOX (halves)
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    ang = pos * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat((a * c - b * s, a * s + b * c), -1)


def _moe(t, p, h, arch):
    logits = h @ t[p + "ffn_gate_inp.weight"].T + t.get(p + "ffn_gate_inp.bias", 0)
    if arch == "qwen3moe":  # softmax → top-k → renormalize
        weights, ids = torch.topk(logits.softmax(-1), N_USED, -1)
        weights = weights / weights.sum(-1, keepdim=True)
    else:  # top-k → softmax
        top, ids = torch.topk(logits, N_USED, -1)
        weights = top.softmax(-1)
    out = torch.zeros_like(h)
    for tok in range(h.shape[0]):
        for j in range(N_USED):
            e = int(ids[tok, j])
            gate = t[p + "ffn_gate_exps.weight"][e] @ h[tok]
            up = t[p + "ffn_up_exps.weight"][e] @ h[tok]
            if arch == "qwen3moe":
                act = torch.nn.functional.silu(gate) * up
            else:
                gate = gate + t[p + "ffn_gate_exps.bias"][e]
                up = up + t[p + "ffn_up_exps.bias"][e]
                x, y = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
                act = x * torch.sigmoid(1.702 * x) * (y + 1)
            down = t[p + "ffn_down_exps.weight"][e] @ act
            if arch == "gpt-oss":
                down = down + t[p + "ffn_down_exps.bias"][e]
            out[tok] += weights[tok, j] * down
    return out


def reference_logits(w: dict[str, np.ndarray], tokens: list[int], arch: str) -> torch.Tensor:
    """All positions' logits (n, V), float64, of the plain transformer."""
    t = {k: torch.from_numpy(v).double() for k, v in w.items()}
    n = len(tokens)
    x = t["token_embd.weight"][tokens]
    q_pos, k_pos = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for i in range(LAYERS):
        p = f"blk.{i}."
        allowed = k_pos <= q_pos
        if arch == "gpt-oss" and i % 2 == 0:  # even layers: sliding window
            allowed = allowed & (q_pos - k_pos < WINDOW)
        h = _norm(x, t[p + "attn_norm.weight"])
        proj = {k: h @ t[p + f"attn_{k}.weight"].T + t.get(p + f"attn_{k}.bias", 0) for k in "qkv"}
        q, k = proj["q"].view(n, H, D), proj["k"].view(n, HKV, D)
        if arch == "qwen3moe":
            q, k = _norm(q, t[p + "attn_q_norm.weight"]), _norm(k, t[p + "attn_k_norm.weight"])
        q, k = _rope(q, n), _rope(k, n).repeat_interleave(H // HKV, 1)
        v = proj["v"].view(n, HKV, D).repeat_interleave(H // HKV, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        if arch == "gpt-oss":  # the sink: one more logit per head, no value
            sink = t[p + "attn_sinks.weight"].view(H, 1, 1).expand(H, n, 1)
            probs = torch.cat((scores, sink), -1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        att = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, H * D)
        x = x + att @ t[p + "attn_output.weight"].T + t.get(p + "attn_output.bias", 0)
        h = _norm(
            x, t[p + ("post_attention_norm" if arch == "gpt-oss" else "ffn_norm") + ".weight"]
        )
        x = x + _moe(t, p, h, arch)
    return (_norm(x, t["output_norm.weight"]) @ t["output.weight"].T).float()
