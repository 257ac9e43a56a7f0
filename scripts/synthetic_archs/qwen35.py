"""qwen35 and qwen35moe (src/models/qwen35.cpp, qwen35moe.cpp): Qwen3.5's hybrid layers — gated delta nets (a q/k/v mix
through a causal conv1d, L2-normalised q/k, alpha/beta gates, the delta rule, a gated
RMSNorm) and, every full_attention_interval-th layer, gated attention (q rows: each head's
query then its sigmoid output gate; QK-norm; interleaved M-RoPE over a quarter of the head);
post-attention norms and a SwiGLU feed-forward everywhere — qwen35moe's a mixture of
experts (16 experts, top-4, softmax → top-k → renormalized) plus a sigmoid-gated shared
expert.

Real head sizes (attention heads of 256 with a 64-dim rope, delta-net heads of 128, a conv
of 4) at few heads: 2 q/k heads tiled onto 4 v heads exercises Qwen3.5's larger models' head
sharing. 4 layers at full_attention_interval 2 (Qwen3.5's is 4): delta nets 0 and 2,
attention 1 and 3. The interval is 2 so that an attention layer comes early: llama.cpp's own
floor (-fa on against off; -t 1 is bit-identical) perturbs only attention layers, and with
attention only at the last layer (interval 4) the floor measured 5e-4 while any rounding
difference in the first delta net (a relative 1e-6 on its output, tandem against itself)
moves the output by 2.4e-3 through the q8_0 activation roundings of the layers after it.

`--mtp N` adds N multi-token-prediction blocks after the layers (llama.cpp's load_block_mtp:
a gated-attention layer with the model's feed-forward, nextn.eh_proj from [embedding;
hidden] 2E → E, nextn.enorm/hnorm and nextn.shared_head_norm, as the converter writes
Qwen3.5's mtp.* weights), block_count counting them and nextn_predict_layers = N.

`sizes` are the released Qwen3.5 models' shapes (their config.json as llama.cpp's converter
maps it: ssm.group_count = linear_num_key_heads, ssm.time_step_rank = linear_num_value_heads,
ssm.state_size = the linear head size 128, conv kernel 4, full_attention_interval 4, head
size 256 with a 64-dim rope, vocabulary 248320), with Q4_K_M's types (_q4_k_m).
Where they come from (the rest is assumed, see SIZES_ASSUMED): llama.cpp's qwen35.cpp /
qwen35moe.cpp (24 layers: 0.8B at n_embd 1024, else 2B; 32: 4B at 2560, else 9B; 64: 27B;
40: 35B-A3B), tests/snapshots/qwen3.6-27b.schema (27B: n_embd 5120, n_ff 17408, 24 heads, 4
KV heads, vocabulary 248320, and which tensors Q4_K_M makes Q6_K).
"""

from __future__ import annotations

from dataclasses import replace

from synthetic_archs import Architecture, Dims, spec, use_more_bits

INTERVAL = 2  # see the docstring

NORMS = (
    spec("attn_norm.weight", "E", kind="norm"),
    spec("post_attention_norm.weight", "E", kind="norm"),
)
DENSE_FFN = (
    spec("ffn_gate.weight", "F", "E"),
    spec("ffn_up.weight", "F", "E"),
    spec("ffn_down.weight", "E", "F"),
)
EXPERT_FFN = (
    spec("ffn_gate_inp.weight", "X", "E", kind="router"),
    spec("ffn_gate_exps.weight", "X", "FX", "E"),
    spec("ffn_up_exps.weight", "X", "FX", "E"),
    spec("ffn_down_exps.weight", "X", "E", "FX"),
    spec("ffn_gate_inp_shexp.weight", "E", kind="bias"),  # the shared expert's gate
    spec("ffn_gate_shexp.weight", "F", "E"),
    spec("ffn_up_shexp.weight", "F", "E"),
    spec("ffn_down_shexp.weight", "E", "F"),
)
COMMON = (*NORMS, *DENSE_FFN)
EXPERTS = (*NORMS, *EXPERT_FFN)
ATTENTION = (
    spec("attn_q.weight", "2Q", "E"),  # per head: query, then gate
    spec("attn_k.weight", "KV", "E"),
    spec("attn_v.weight", "KV", "E"),
    spec("attn_output.weight", "E", "Q"),
    spec("attn_q_norm.weight", "D", kind="norm"),
    spec("attn_k_norm.weight", "D", kind="norm"),
)
MIX = "2KD+VD"  # the delta net's q/k/v channels
DELTA_NET = (
    spec("attn_qkv.weight", MIX, "E"),
    spec("attn_gate.weight", "VD", "E"),
    spec("ssm_conv1d.weight", MIX, 4),
    spec("ssm_dt.bias", "LV", kind="bias"),
    spec("ssm_a", "LV", kind="decay"),
    spec("ssm_beta.weight", "LV", "E"),
    spec("ssm_alpha.weight", "LV", "E"),
    spec("ssm_norm.weight", 128, kind="norm"),
    spec("ssm_out.weight", "E", "VD"),
)
NEXTN = (  # an MTP block's own tensors, beside its attention layer and feed-forward
    spec("nextn.eh_proj.weight", "E", "2E"),
    spec("nextn.enorm.weight", "E", kind="norm"),
    spec("nextn.hnorm.weight", "E", kind="norm"),
    spec("nextn.shared_head_norm.weight", "E", kind="norm"),
)


def _layer(i: int, d: Dims) -> tuple:
    return ATTENTION if (i + 1) % d.interval == 0 else DELTA_NET


def _metadata(d: Dims) -> dict:
    return {
        "rope.freq_base": 10000000.0,
        "rope.dimension_count": d.head_dim // 4,
        "rope.dimension_sections": [11, 11, 10, 0],
        "attention.layer_norm_rms_epsilon": 1e-6,
        "full_attention_interval": d.interval,
        "ssm.conv_kernel": 4,
        "ssm.state_size": d.linear_head_dim,
        "ssm.group_count": d.linear_k_heads,
        "ssm.time_step_rank": d.linear_v_heads,
        "ssm.inner_size": d.linear_v_heads * d.linear_head_dim,
    }


def _moe_metadata(d: Dims) -> dict:
    return _metadata(d) | {
        "expert_count": d.experts,
        "expert_used_count": d.experts_used,
        "expert_feed_forward_length": d.expert_ffn,
        "expert_shared_feed_forward_length": d.ffn,
    }


def _q4_k_m(name: str, default: str, layers: int) -> str:
    """llama.cpp's Q4_K_M for Qwen3.5 (tests/snapshots/qwen3.6-27b.schema, qwen3.5-397b-a17b):
    Q6_K for the output (a tied model's token_embd) and, in use_more_bits blocks, for the
    delta nets' attn_qkv, attention's attn_v and every ffn_down (routed and shared); Q4_K
    for the other matrices."""
    if name == "output.weight":
        return "Q6_K"
    if name.endswith(
        (
            "attn_qkv.weight",
            "attn_v.weight",
            "ffn_down.weight",
            "_down_exps.weight",
            "ffn_down_shexp.weight",
        )
    ):
        block = int(name.split(".")[1])
        return "Q6_K" if block < layers and use_more_bits(block, layers) else "Q4_K"
    return "Q4_K"


# What llama.cpp's sources do not state (module docstring), from Qwen's published configs
# as cross-checked where a source was at hand: 0.8b (dim 1024, FFN 3584, 8/2 heads) and
# 35b-a3b (dim 2048, 16/2 heads, 256 experts top-8 of 512, shared expert 512, delta nets
# 16 q/k / 32 v heads) agree with THUDM/slime's model scripts; 2b's parameter count, 1.88 B,
# is the one llama.cpp's docs/build-riscv64-spacemit.md prints for "qwen35 2B".
SIZES_ASSUMED = (
    "0.8b: delta-net heads 16/16; 2b: dim 2048, FFN 6144, heads 8/2, delta nets 16/16; "
    "4b: FFN 9216, heads 16/4, delta nets 16/32; 9b: dim 4096, FFN 12288, heads 16/4, "
    "delta nets 16/32; 27b: delta nets 16/48; tied heads for 0.8b, 2b and 4b"
)
REAL = Dims(head_dim=256, ctx=262144, linear_k_heads=16, linear_head_dim=128, interval=4)
SIZES = {
    "0.8b": replace(
        REAL, layers=24, dim=1024, ffn=3584, heads=8, kv_heads=2, linear_v_heads=16, tied=True
    ),
    "2b": replace(
        REAL, layers=24, dim=2048, ffn=6144, heads=8, kv_heads=2, linear_v_heads=16, tied=True
    ),
    "4b": replace(
        REAL, layers=32, dim=2560, ffn=9216, heads=16, kv_heads=4, linear_v_heads=32, tied=True
    ),
    "9b": replace(REAL, layers=32, dim=4096, ffn=12288, heads=16, kv_heads=4, linear_v_heads=32),
    "27b": replace(REAL, layers=64, dim=5120, ffn=17408, heads=24, kv_heads=4, linear_v_heads=48),
}
MOE_SIZES = {
    "35b-a3b": replace(
        REAL,
        layers=40,
        dim=2048,
        ffn=512,
        heads=16,
        kv_heads=2,
        linear_v_heads=32,
        experts=256,
        experts_used=8,
        expert_ffn=512,
    ),
}
# the conformance models: real head sizes at few heads (2 q/k heads → 4 v heads)
SMALL = Dims(linear_k_heads=2, linear_v_heads=4, linear_head_dim=128, interval=INTERVAL)

ENTRIES = (
    Architecture(
        "qwen35",
        COMMON,
        dims=replace(SMALL, layers=4, dim=256, ffn=512, heads=4, kv_heads=2, head_dim=256),
        layer_extra=_layer,
        extra_metadata=_metadata,
        note="2 gated delta nets (2 q/k heads → 4 v heads of 128, conv 4) between 2 gated "
        "attention layers (QK-norm, M-RoPE over 64 of 256 dims)",
        mtp=(*COMMON, *ATTENTION, *NEXTN),
        sizes=SIZES,
        real_type=_q4_k_m,
    ),
    Architecture(
        "qwen35moe",
        EXPERTS,
        dims=replace(
            SMALL,
            layers=4,
            dim=256,
            ffn=128,
            heads=4,
            kv_heads=2,
            head_dim=256,
            experts=16,
            experts_used=4,
            expert_ffn=64,
        ),
        layer_extra=_layer,
        extra_metadata=_moe_metadata,
        note="qwen35's layers; 16 experts top-4 (softmax → top-k → renormalized) and a "
        "sigmoid-gated shared expert",
        mtp=(*EXPERTS, *ATTENTION, *NEXTN),
        sizes=MOE_SIZES,
        real_type=_q4_k_m,
    ),
)
