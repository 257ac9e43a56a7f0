"""smollm3 (src/models/smollm3.cpp): the llama block; every fourth layer (3, 7, …) applies
no rope (NoPE)."""

from __future__ import annotations

from synthetic_archs import LLAMA_LAYER, Architecture, Dims

ENTRIES = (
    Architecture(
        "smollm3",
        LLAMA_LAYER,
        dims=Dims(layers=4),  # layer 3 is a NoPE layer
        note="4 layers, layer 3 without rope (NoPE)",
    ),
)
