"""mistral3 (Ministral / Mistral Small 3.x text): the llama layer; its rope may be YaRN-
scaled (rope.scaling.type yarn with factor, original_context_length, yarn_beta_fast/slow,
yarn_log_multiplier: kernels/rope.py). (llama.cpp: src/models/mistral3.cpp.)

    h = norm(x);  x += o(attention(rope(q(h)), rope(k(h)), v(h)))
    h = norm(x);  x += down(silu(gate(h)) · up(h))
"""

from __future__ import annotations

from runtime.models.llama import Llama


class Mistral3(Llama):
    architectures = ("mistral3",)
