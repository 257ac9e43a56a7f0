"""gemma2 (src/models/gemma2.cpp): pre- and post-norms around attention and the GELU
feed-forward, √E embedding scale, tied head, attention-score and final-logit soft-capping
(caps lowered here so that they bind on a random model), every other layer from the first
over a sliding window (shorter than the evaluated context)."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture, Dims, spec

ENTRIES = (
    Architecture(
        "gemma2",
        (
            *LLAMA_LAYER,
            spec("post_attention_norm.weight", "E", kind="norm"),
            spec("post_ffw_norm.weight", "E", kind="norm"),
        ),
        dims=Dims(layers=3, window=16),  # layers 0, 2 sliding-window; layer 1 global
        tied=True,
        extra_metadata=lambda d: {
            "attention.sliding_window": d.window,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 30.0,
            "attention.layer_norm_rms_epsilon": 1e-6,
        },
        head_scale=0.1,  # llama.cpp's mean top-1 p ≥ 0.3 on the test text
        note="soft-caps 2 (scores) and 30 (logits), SWA every other layer (window 16)",
    ),
)
