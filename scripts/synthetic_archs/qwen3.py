"""qwen3 (src/models/qwen3.cpp): the llama block with per-head RMSNorm of q and k (weights of
the head size) before NEOX rope; no q/k/v biases."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture, spec

ENTRIES = (
    Architecture(
        "qwen3",
        (
            *LLAMA_LAYER,
            spec("attn_q_norm.weight", "D", kind="norm"),
            spec("attn_k_norm.weight", "D", kind="norm"),
        ),
        extra_metadata=lambda d: {"attention.layer_norm_rms_epsilon": 1e-6},
        note="per-head QK-norm, NEOX rope",
    ),
)
