"""phi3 (src/models/phi3.cpp): one fused attn_qkv (q, k, v rows in turn), one ffn_up of the
gate's rows then the up's (SwiGLU over its halves), NEOX rope with LongRoPE's per-pair
factors (rope_factors_short at a context within original_context_length; the long ones
past it) and its attention factor on cos/sin. Its sliding window is dropped by llama.cpp."""

from __future__ import annotations

from synthetic_archs import Architecture, spec

ENTRIES = (
    Architecture(
        "phi3",
        (
            spec("attn_norm.weight", "E", kind="norm"),
            spec("attn_qkv.weight", "Q+2KV", "E"),
            spec("attn_output.weight", "E", "Q"),
            spec("ffn_norm.weight", "E", kind="norm"),
            spec("ffn_up.weight", "2F", "E"),
            spec("ffn_down.weight", "E", "F"),
        ),
        globals=(
            spec("rope_factors_long.weight", "R", kind="rope_factors"),
            spec("rope_factors_short.weight", "R", kind="rope_factors"),
        ),
        extra_metadata=lambda d: {
            "rope.scaling.type": "longrope",
            "rope.scaling.attn_factor": 1.19,
            "rope.scaling.original_context_length": d.ctx,
            "attention.sliding_window": 2047,
        },
        model_name="synthetic fused-qkv longrope",  # not "phi3": see Architecture.model_name
        note="fused QKV and gate-up, LongRoPE short factors, attn factor 1.19",
    ),
)
