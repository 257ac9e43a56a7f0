"""Tiny random-weight GGUFs of every architecture tandem runs (F32, real tensor names and
metadata keys), and a plain torch forward of each written from llama.cpp's graph
(src/models/ARCH.cpp) independently of runtime/models: the tests' second opinion where
llama.cpp itself is not at hand (its own outputs are the conformance fixtures)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn.functional as F

E, H, HKV, D, FF, V = 64, 4, 2, 16, 96, 50
EPS = 1e-6
VT = gguf.GGUFValueType
NEOX = {"qwen2", "qwen3", "olmo2", "phi3", "gemma2", "gemma3"}
# architecture → its extra metadata (key after "ARCH.", value, type)
EXTRA: dict[str, list[tuple[str, object, VT]]] = {
    "granite": [
        ("logit_scale", 8.0, VT.FLOAT32),
        ("residual_scale", 0.22, VT.FLOAT32),
        ("embedding_scale", 12.0, VT.FLOAT32),
        ("attention.scale", 0.0078125 * 16, VT.FLOAT32),
    ],
    "phi3": [
        ("rope.scaling.attn_factor", 1.19, VT.FLOAT32),
        ("rope.scaling.original_context_length", 64, VT.UINT32),
    ],
    "gemma2": [
        ("attn_logit_softcapping", 5.0, VT.FLOAT32),
        ("final_logit_softcapping", 3.0, VT.FLOAT32),
        ("attention.sliding_window", 4, VT.UINT32),
    ],
    "mistral3": [
        ("rope.scaling.type", "yarn", VT.STRING),
        ("rope.scaling.factor", 16.0, VT.FLOAT32),
        ("rope.scaling.original_context_length", 4096, VT.UINT32),
        ("rope.scaling.yarn_beta_fast", 32.0, VT.FLOAT32),
        ("rope.scaling.yarn_beta_slow", 1.0, VT.FLOAT32),
        ("rope.scaling.yarn_log_multiplier", 0.5, VT.FLOAT32),
    ],
}
ARCHS = ("llama3", "qwen3", "olmo2", "granite", "smollm3", "phi3", "gemma2", "mistral3")


def n_layers(arch: str) -> int:
    return 4 if arch == "smollm3" else 2  # smollm3: layer 3 is its NoPE layer


def gguf_arch(arch: str) -> str:
    return "llama" if arch == "llama3" else arch


def make_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Tensor name → numpy array (rows, row length), as GGUFWriter takes them."""
    g = np.random.default_rng(seed)

    def rnd(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (g.standard_normal(shape) * scale).astype(np.float32)

    w = {"token_embd.weight": rnd(V, E, scale=1.0), "output_norm.weight": 1 + rnd(E)}
    if arch != "gemma2":  # gemma2's head is the embeddings
        w["output.weight"] = rnd(V, E)
    if arch == "llama3":  # Llama 3.x: high-frequency pairs kept, low ones divided by 8
        w["rope_freqs.weight"] = np.array([1.0] * 3 + [1.7, 3.9, 8.0, 8.0, 8.0], np.float32)
    if arch == "phi3":
        w["rope_factors_short.weight"] = (1 + g.random(D // 2)).astype(np.float32)
        w["rope_factors_long.weight"] = (4 + g.random(D // 2)).astype(np.float32)
    for i in range(n_layers(arch)):
        p = f"blk.{i}."
        if arch != "olmo2":
            w[p + "attn_norm.weight"] = 1 + rnd(E)
            w[p + "ffn_norm.weight"] = 1 + rnd(E)
        if arch == "phi3":
            w[p + "attn_qkv.weight"] = rnd(H * D + 2 * HKV * D, E)
            w[p + "ffn_up.weight"] = rnd(2 * FF, E)
        else:
            w[p + "attn_q.weight"] = rnd(H * D, E)
            w[p + "attn_k.weight"] = rnd(HKV * D, E)
            w[p + "attn_v.weight"] = rnd(HKV * D, E)
            w[p + "ffn_gate.weight"] = rnd(FF, E)
            w[p + "ffn_up.weight"] = rnd(FF, E)
        w[p + "attn_output.weight"] = rnd(E, H * D)
        w[p + "ffn_down.weight"] = rnd(E, FF)
        if arch == "qwen3":
            w[p + "attn_q_norm.weight"] = 1 + rnd(D)
            w[p + "attn_k_norm.weight"] = 1 + rnd(D)
        if arch == "olmo2":
            w[p + "attn_q_norm.weight"] = 1 + rnd(H * D)
            w[p + "attn_k_norm.weight"] = 1 + rnd(HKV * D)
        if arch in ("olmo2", "gemma2"):
            w[p + "post_attention_norm.weight"] = 1 + rnd(E)
            w[p + "post_ffw_norm.weight"] = 1 + rnd(E)
    return w


def write_gguf(path: Path, arch: str, weights: dict[str, np.ndarray]) -> Path:
    name = gguf_arch(arch)
    writer = gguf.GGUFWriter(str(path), name)
    writer.add_block_count(n_layers(arch))
    writer.add_context_length(256)
    writer.add_embedding_length(E)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(H)
    writer.add_head_count_kv(HKV)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_vocab_size(V)
    for key, value, vtype in EXTRA.get(arch, []):
        writer.add_key_value(f"{name}.{key}", value, vtype)
    for tensor, array in weights.items():
        writer.add_tensor(tensor, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _extra(arch: str) -> dict[str, Any]:
    return {k: v for k, v, _ in EXTRA.get(arch, [])}


def _rope_tables(arch: str, t: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, D/2) as ggml's rope_yarn makes them for this file's scaling."""
    x = _extra(arch)
    i = torch.arange(D // 2, dtype=torch.float64)
    theta = 10000.0 ** (-2 * i / D)
    ff = t.get("rope_freqs.weight", t.get("rope_factors_short.weight"))
    if ff is not None:
        theta = theta / ff.double()
    extrap = torch.arange(n, dtype=torch.float64)[:, None] * theta  # (n, D/2)
    mscale = float(x.get("rope.scaling.attn_factor", 1.0))
    angle = extrap
    if x.get("rope.scaling.type") == "yarn":
        factor, orig = (
            float(x["rope.scaling.factor"]),
            int(x["rope.scaling.original_context_length"]),
        )

        def corr(beta: float) -> float:
            return D * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(10000.0))

        low = max(0.0, math.floor(corr(float(x["rope.scaling.yarn_beta_fast"]))))
        high = min(D - 1.0, math.ceil(corr(float(x["rope.scaling.yarn_beta_slow"]))))
        ramp = 1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)
        angle = extrap / factor * (1 - ramp) + extrap * ramp

        def get_mscale(m: float) -> float:
            return 0.1 * m * math.log(factor) + 1.0

        mscale *= get_mscale(1.0) / get_mscale(float(x["rope.scaling.yarn_log_multiplier"]))
    return (angle.cos() * mscale).float(), (angle.sin() * mscale).float()


def reference_logits(arch: str, w: dict[str, np.ndarray], tokens: list[int]) -> torch.Tensor:
    """Every position's logits (n, V) by the plain forward of `arch` (float32)."""
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    x = _extra(arch)
    n, neox = len(tokens), gguf_arch(arch) in NEOX
    cos, sin = _rope_tables(arch, t, n)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def norm(v, weight):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + EPS) * weight

    def rope(v):  # (n, heads, D)
        a, b = (v[..., : D // 2], v[..., D // 2 :]) if neox else (v[..., 0::2], v[..., 1::2])
        ra, rb = a * cos - b * sin, a * sin + b * cos
        return torch.cat((ra, rb), -1) if neox else torch.stack((ra, rb), -1).flatten(-2)

    h_ = t["token_embd.weight"][tokens]
    if arch == "gemma2":
        h_ = h_ * math.sqrt(E)
    if arch == "granite":
        h_ = h_ * x["embedding_scale"]
    scale = float(x.get("attention.scale", D**-0.5))
    resid = float(x.get("residual_scale", 1.0))
    pos = torch.arange(n)
    for il in range(n_layers(arch)):
        p = f"blk.{il}."
        a_in = h_ if arch == "olmo2" else norm(h_, t[p + "attn_norm.weight"])
        if arch == "phi3":
            q, k, v = (a_in @ t[p + "attn_qkv.weight"].T).split([H * D, HKV * D, HKV * D], -1)
        else:
            q, k, v = (a_in @ t[p + f"attn_{c}.weight"].T for c in "qkv")
        if arch == "olmo2":
            q, k = norm(q, t[p + "attn_q_norm.weight"]), norm(k, t[p + "attn_k_norm.weight"])
        q, k, v = q.view(n, H, D), k.view(n, HKV, D), v.view(n, HKV, D)
        if arch == "qwen3":
            q, k = norm(q, t[p + "attn_q_norm.weight"]), norm(k, t[p + "attn_k_norm.weight"])
        if not (arch == "smollm3" and (il + 1) % 4 == 0):
            q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        if arch == "gemma2":
            cap = x["attn_logit_softcapping"]
            s = cap * torch.tanh(s / cap)
        allowed = pos[None, :] <= pos[:, None]
        if arch == "gemma2" and il % 2 == 0:
            allowed &= (pos[:, None] - pos[None, :]) < x["attention.sliding_window"]
        att = torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, -math.inf).softmax(-1), v)
        a = att.reshape(n, H * D) @ t[p + "attn_output.weight"].T
        if arch in ("olmo2", "gemma2"):
            a = norm(a, t[p + "post_attention_norm.weight"])
        h_ = h_ + a * resid
        f_in = h_ if arch == "olmo2" else norm(h_, t[p + "ffn_norm.weight"])
        if arch == "phi3":
            gate, up = (f_in @ t[p + "ffn_up.weight"].T).split([FF, FF], -1)
        else:
            gate, up = f_in @ t[p + "ffn_gate.weight"].T, f_in @ t[p + "ffn_up.weight"].T
        act = F.gelu(gate, approximate="tanh") if arch == "gemma2" else F.silu(gate)
        f = (act * up) @ t[p + "ffn_down.weight"].T
        if arch in ("olmo2", "gemma2"):
            f = norm(f, t[p + "post_ffw_norm.weight"])
        h_ = h_ + f * resid
    head = t.get("output.weight", t["token_embd.weight"])
    logits = norm(h_, t["output_norm.weight"]) @ head.T
    if arch == "granite":
        logits = logits / x["logit_scale"]
    if arch == "gemma2":
        cap = x["final_logit_softcapping"]
        logits = cap * torch.tanh(logits / cap)
    return logits
