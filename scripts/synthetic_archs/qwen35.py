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
moves the output by 2.4e-3 through the q8_0 activation roundings of the layers after it."""

from __future__ import annotations

from synthetic_archs import Architecture, Dims, spec

CONV, STATE, K_HEADS, V_HEADS = 4, 128, 2, 4
MIX = 2 * K_HEADS * STATE + V_HEADS * STATE  # the delta net's q/k/v channels
INTERVAL = 2  # see the docstring

NORMS = (
    spec("attn_norm.weight", "E", kind="norm"),
    spec("post_attention_norm.weight", "E", kind="norm"),
)
COMMON = (
    *NORMS,
    spec("ffn_gate.weight", "F", "E"),
    spec("ffn_up.weight", "F", "E"),
    spec("ffn_down.weight", "E", "F"),
)
EXPERTS = (
    *NORMS,
    spec("ffn_gate_inp.weight", "X", "E", kind="router"),
    spec("ffn_gate_exps.weight", "X", "FX", "E"),
    spec("ffn_up_exps.weight", "X", "FX", "E"),
    spec("ffn_down_exps.weight", "X", "E", "FX"),
    spec("ffn_gate_inp_shexp.weight", "E", kind="bias"),  # the shared expert's gate
    spec("ffn_gate_shexp.weight", "F", "E"),
    spec("ffn_up_shexp.weight", "F", "E"),
    spec("ffn_down_shexp.weight", "E", "F"),
)
ATTENTION = (
    spec("attn_q.weight", "2Q", "E"),  # per head: query, then gate
    spec("attn_k.weight", "KV", "E"),
    spec("attn_v.weight", "KV", "E"),
    spec("attn_output.weight", "E", "Q"),
    spec("attn_q_norm.weight", "D", kind="norm"),
    spec("attn_k_norm.weight", "D", kind="norm"),
)
DELTA_NET = (
    spec("attn_qkv.weight", MIX, "E"),
    spec("attn_gate.weight", V_HEADS * STATE, "E"),
    spec("ssm_conv1d.weight", MIX, CONV),
    spec("ssm_dt.bias", V_HEADS, kind="bias"),
    spec("ssm_a", V_HEADS, kind="decay"),
    spec("ssm_beta.weight", V_HEADS, "E"),
    spec("ssm_alpha.weight", V_HEADS, "E"),
    spec("ssm_norm.weight", STATE, kind="norm"),
    spec("ssm_out.weight", "E", V_HEADS * STATE),
)


def _layer(i: int, d: Dims) -> tuple:
    return ATTENTION if (i + 1) % INTERVAL == 0 else DELTA_NET


def _metadata(d: Dims) -> dict:
    return {
        "rope.freq_base": 10000000.0,
        "rope.dimension_count": d.head_dim // 4,
        "rope.dimension_sections": [11, 11, 10, 0],
        "attention.layer_norm_rms_epsilon": 1e-6,
        "full_attention_interval": INTERVAL,
        "ssm.conv_kernel": CONV,
        "ssm.state_size": STATE,
        "ssm.group_count": K_HEADS,
        "ssm.time_step_rank": V_HEADS,
        "ssm.inner_size": V_HEADS * STATE,
    }


def _moe_metadata(d: Dims) -> dict:
    return _metadata(d) | {
        "expert_count": d.experts,
        "expert_used_count": d.experts_used,
        "expert_feed_forward_length": d.expert_ffn,
        "expert_shared_feed_forward_length": d.ffn,
    }


ENTRIES = (
    Architecture(
        "qwen35",
        COMMON,
        dims=Dims(layers=4, dim=256, ffn=512, heads=4, kv_heads=2, head_dim=256),
        layer_extra=_layer,
        extra_metadata=_metadata,
        note="2 gated delta nets (2 q/k heads → 4 v heads of 128, conv 4) between 2 gated "
        "attention layers (QK-norm, M-RoPE over 64 of 256 dims)",
    ),
    Architecture(
        "qwen35moe",
        EXPERTS,
        dims=Dims(
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
    ),
)
