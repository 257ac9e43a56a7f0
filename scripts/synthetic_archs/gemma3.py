"""gemma3 (src/models/gemma3.cpp): QK-norm, post-attention and post-FFN norms, GELU gating,
√E embedding scale, five sliding-window layers in six (rope base 10000 there), tied head."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture, Dims, spec

ENTRIES = (
    Architecture(
        "gemma3",
        (
            *LLAMA_LAYER,
            spec("attn_q_norm.weight", "D", kind="norm"),
            spec("attn_k_norm.weight", "D", kind="norm"),
            spec("post_attention_norm.weight", "E", kind="norm"),
            spec("post_ffw_norm.weight", "E", kind="norm"),
        ),
        # 7 layers: sliding-window layers 0-4 and 6, global layer 5; a window shorter than
        # the evaluated context, so the window is exercised
        dims=Dims(layers=7, head_dim=32, window=16),
        tied=True,
        extra_metadata=lambda d: {
            "attention.sliding_window": d.window,
            "rope.freq_base": 1000000.0,
            "attention.layer_norm_rms_epsilon": 1e-6,
        },
        note="QK-norm, post-norms, GELU, √E scale, SWA 5:1 (window 16), rope 1e6/1e4, tied",
    ),
)
