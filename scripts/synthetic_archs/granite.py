"""granite (src/models/granite.cpp): the llama block with its multipliers — embeddings ×
embedding_scale, q·k × attention.scale, each block's output × residual_scale, logits ÷
logit_scale (a required key)."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture

ENTRIES = (
    Architecture(
        "granite",
        LLAMA_LAYER,
        tied=True,  # a tied random head: large top-1 margins
        head_scale=0.4,  # llama.cpp's mean top-1 p ≥ 0.3 on the test text
        extra_metadata=lambda d: {
            "logit_scale": 4.0,
            "residual_scale": 0.22,
            "embedding_scale": 12.0,
            "attention.scale": 0.1,
        },
        note="embedding ×12, attention scale 0.1, residual ×0.22, logits ÷4",
    ),
)
