"""Mixture-of-experts architectures: qwen3moe (src/models/qwen3moe.cpp: QK-norm, 128 routed
experts of which 8 per token, softmax → top-k → renormalized) and gpt-oss (openai-moe.cpp:
q/k/v/o biases, attention sinks, alternating sliding window, experts with biases in MXFP4,
top-k → softmax, clamped SwiGLU). Expert tensors are (experts, rows, cols) in numpy order.

Small dims keep a conformance forward fast; `sizes` are Qwen3-30B-A3B's and gpt-oss-20b's, for
metadata-only files (`--size 30b-a3b|20b --metadata-only`), with the types of their common
quantizations (Q4_K_M; gpt-oss's MXFP4 release)."""

from __future__ import annotations

from synthetic_archs import Architecture, Dims, spec, use_more_bits

ATTN = (
    spec("attn_norm.weight", "E", kind="norm"),
    spec("attn_q.weight", "Q", "E"),
    spec("attn_k.weight", "KV", "E"),
    spec("attn_v.weight", "KV", "E"),
    spec("attn_output.weight", "E", "Q"),
)
EXPERTS = (
    spec("ffn_gate_inp.weight", "X", "E", kind="router"),
    spec("ffn_gate_exps.weight", "X", "FX", "E"),
    spec("ffn_up_exps.weight", "X", "FX", "E"),
    spec("ffn_down_exps.weight", "X", "E", "FX"),
)


def _q4_k_m(name: str, default: str, layers: int) -> str:
    """llama.cpp's Q4_K_M choices for Qwen3-30B-A3B (llama-quant.cpp): Q6_K for the
    output and for attn_v and ffn_down in use_more_bits layers, Q4_K elsewhere; the router
    stays F32."""
    if name == "output.weight":
        return "Q6_K"
    if name.endswith(("attn_v.weight", "ffn_down_exps.weight")):
        return "Q6_K" if use_more_bits(int(name.split(".")[1]), layers) else "Q4_K"
    if name.endswith(("norm.weight", "ffn_gate_inp.weight")):
        return "F32"
    return "Q4_K"


def _gpt_oss_release(name: str, default: str, layers: int) -> str:
    """ggml-org's gpt-oss-20b GGUF: MXFP4 experts, Q8_0 elsewhere, F32 norms and biases."""
    if "_exps.weight" in name:
        return "MXFP4"
    if name.endswith((".bias", "norm.weight", "attn_sinks.weight", "ffn_gate_inp.weight")):
        return "F32"
    return "Q8_0"


ENTRIES = (
    Architecture(
        "qwen3moe",
        (
            *ATTN,
            spec("attn_q_norm.weight", "D", kind="norm"),
            spec("attn_k_norm.weight", "D", kind="norm"),
            spec("ffn_norm.weight", "E", kind="norm"),
            *EXPERTS,
        ),
        dims=Dims(layers=2, dim=128, ffn=64, experts=16, experts_used=4, expert_ffn=64),
        extra_metadata=lambda d: {
            "expert_count": d.experts,
            "expert_used_count": d.experts_used,
            "expert_feed_forward_length": d.expert_ffn,
            "rope.freq_base": 1000000.0,
            "attention.layer_norm_rms_epsilon": 1e-6,
        },
        head_scale=8.0,  # llama.cpp's mean top-1 probability ≥ 0.3 (4.0 gave 0.22)
        note="QK-norm, 16 experts top-4 (softmax → top-k → renormalized), NEOX rope",
        sizes={
            "30b-a3b": Dims(
                layers=48,
                dim=2048,
                ffn=6144,
                heads=32,
                kv_heads=4,
                head_dim=128,
                ctx=40960,
                experts=128,
                experts_used=8,
                expert_ffn=768,
            )
        },
        real_type=_q4_k_m,
    ),
    Architecture(
        "gpt-oss",
        (
            *ATTN,
            spec("attn_q.bias", "Q", kind="bias"),
            spec("attn_k.bias", "KV", kind="bias"),
            spec("attn_v.bias", "KV", kind="bias"),
            spec("attn_output.bias", "E", kind="bias"),
            spec("attn_sinks.weight", "H", kind="bias"),
            spec("post_attention_norm.weight", "E", kind="norm"),
            *EXPERTS,
            spec("ffn_gate_inp.bias", "X", kind="bias"),
            spec("ffn_gate_exps.bias", "X", "FX", kind="bias"),
            spec("ffn_up_exps.bias", "X", "FX", kind="bias"),
            spec("ffn_down_exps.bias", "X", "E", kind="bias"),
        ),
        # 4 layers: sliding-window layers 0 and 2 (window 16), global 1 and 3
        dims=Dims(layers=4, dim=128, ffn=64, experts=8, experts_used=4, expert_ffn=64, window=16),
        extra_metadata=lambda d: {
            "expert_count": d.experts,
            "expert_used_count": d.experts_used,
            "expert_feed_forward_length": d.expert_ffn,
            "attention.sliding_window": d.window,
            "rope.freq_base": 150000.0,
            # the release's YaRN (factor 32 over 4096 tokens), on every layer
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": 32.0,
            "rope.scaling.original_context_length": 4096,
        },
        head_scale=8.0,  # (4.0 gave a mean top-1 probability of 0.25)
        note="biases, attention sinks, SWA every other layer (window 16), MXFP4 experts top-4 "
        "(top-k → softmax), clamped SwiGLU, YaRN rope (factor 32) on every layer",
        sizes={
            "20b": Dims(
                layers=24,
                dim=2880,
                ffn=2880,
                heads=64,
                kv_heads=8,
                head_dim=64,
                ctx=131072,
                experts=32,
                experts_used=4,
                expert_ffn=2880,
                window=128,
            )
        },
        real_type=_gpt_oss_release,
        expert_type="MXFP4",
    ),
)
