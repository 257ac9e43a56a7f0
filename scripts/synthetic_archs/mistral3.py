"""mistral3 (src/models/mistral3.cpp): the llama block with YaRN rope scaling (factor,
original_context_length, beta_fast/slow, yarn_log_multiplier: llama.cpp's rope_yarn ramp
and its attention factor)."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture

ENTRIES = (
    Architecture(
        "mistral3",
        LLAMA_LAYER,
        extra_metadata=lambda d: {
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": 4.0,
            "rope.scaling.original_context_length": 64,
            "rope.scaling.yarn_beta_fast": 32.0,
            "rope.scaling.yarn_beta_slow": 1.0,
            "rope.scaling.yarn_log_multiplier": 0.5,
        },
        note="YaRN ×4 over 64 positions (pairs 0-4 extrapolated), log multiplier 0.5",
    ),
)
