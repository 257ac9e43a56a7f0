"""olmo2 (src/models/olmo2.cpp): no norm before attention or the feed-forward; RMSNorm of q
and k over all heads at once (weights of Q and KV), NEOX rope, and norms after attention
and after the feed-forward."""

from __future__ import annotations

from synthetic_archs import Architecture, spec

ENTRIES = (
    Architecture(
        "olmo2",
        (
            spec("attn_q.weight", "Q", "E"),
            spec("attn_k.weight", "KV", "E"),
            spec("attn_v.weight", "KV", "E"),
            spec("attn_output.weight", "E", "Q"),
            spec("attn_q_norm.weight", "Q", kind="norm"),
            spec("attn_k_norm.weight", "KV", kind="norm"),
            spec("post_attention_norm.weight", "E", kind="norm"),
            spec("ffn_gate.weight", "F", "E"),
            spec("ffn_up.weight", "F", "E"),
            spec("ffn_down.weight", "E", "F"),
            spec("post_ffw_norm.weight", "E", kind="norm"),
        ),
        extra_metadata=lambda d: {"attention.layer_norm_rms_epsilon": 1e-6},
        head_scale=8.0,  # llama.cpp's mean top-1 p ≥ 0.3 on the test text
        note="post-norms only, QK-norm over all heads, NEOX rope",
    ),
)
