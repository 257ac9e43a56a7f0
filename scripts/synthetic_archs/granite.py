"""granite (src/models/granite.cpp): the llama block with its multipliers — embeddings ×
embedding_scale, q·k × attention.scale, each block's output × residual_scale, logits ÷
logit_scale (a required key)."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture

ENTRIES = (
    Architecture(
        "granite",
        LLAMA_LAYER,
        # logits ÷ logit_scale: 4 × the default head_scale keeps the untied random head as
        # confident as the llama entry's (llama.cpp's mean top-1 p 0.58 on the test text)
        head_scale=32.0,
        extra_metadata=lambda d: {
            "logit_scale": 4.0,
            "residual_scale": 0.22,
            "embedding_scale": 12.0,
            "attention.scale": 0.1,
        },
        note="embedding ×12, attention scale 0.1, residual ×0.22, logits ÷4",
    ),
)
