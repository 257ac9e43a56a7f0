"""llama, mistral, qwen2: the llama block (src/models/llama.cpp, mistral3's predecessor
mistral.cpp — llama's graph under another name — and qwen2.cpp, which adds q/k/v biases and
NEOX rope)."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture, spec

ENTRIES = (
    Architecture("llama", LLAMA_LAYER, note="GQA 4/2, SwiGLU, normal rope, untied head"),
    Architecture("mistral", LLAMA_LAYER, note="llama's graph under mistral's name"),
    Architecture(
        "qwen2",
        (
            *LLAMA_LAYER,
            spec("attn_q.bias", "Q", kind="bias"),
            spec("attn_k.bias", "KV", kind="bias"),
            spec("attn_v.bias", "KV", kind="bias"),
        ),
        note="q/k/v biases, NEOX rope",
    ),
)
