"""llama, mistral, qwen2: the llama block (src/models/llama.cpp; qwen2.cpp adds q/k/v biases
and NEOX rope). llama.cpp has no "mistral" architecture (its converter writes Mistral 7B as
"llama"); tandem accepts the name, and conformance.py runs llama.cpp on the same weights
named llama."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture, spec

ENTRIES = (
    Architecture("llama", LLAMA_LAYER, note="GQA 4/2, SwiGLU, normal rope, untied head"),
    Architecture(
        "mistral",
        LLAMA_LAYER,
        note="llama's graph under mistral's name (llama.cpp: arch llama, as Mistral 7B GGUFs)",
        llama_cpp_name="llama",
    ),
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
