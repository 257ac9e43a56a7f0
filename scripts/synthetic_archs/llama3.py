"""llama3: Llama 3.x — the llama block (src/models/llama.cpp) whose rope divides each pair's
frequency by the file's `rope_freqs.weight` (llama3 scaling, written by the converter as
that tensor; llama.cpp's get_rope_factors). Written as general.architecture "llama"."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture, spec

ENTRIES = (
    Architecture(
        "llama3",
        LLAMA_LAYER,
        globals=(spec("rope_freqs.weight", "R", kind="rope_factors"),),
        arch_name="llama",
        extra_metadata=lambda d: {"rope.freq_base": 500000.0},
        note="llama with rope_freqs (Llama 3.x scaling factors 1-8), rope base 5e5",
    ),
)
