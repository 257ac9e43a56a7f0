"""smollm3: the llama layer, except that every fourth layer (3, 7, 11, …) applies no RoPE
(NoPE: attention over unrotated q and k; config.rope_layers). (llama.cpp:
src/models/smollm3.cpp, n_no_rope_layer_step = 4.)

    h = norm(x);  x += o(attention(rope?(q(h)), rope?(k(h)), v(h)))
    h = norm(x);  x += down(silu(gate(h)) · up(h))
"""

from __future__ import annotations

from runtime.models.llama import Llama


class SmolLM3(Llama):
    architectures = ("smollm3",)
