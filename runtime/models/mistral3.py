"""mistral3 (Ministral 3 / Mistral 3 text): the llama layer; its rope may be YaRN-scaled
(rope.scaling.type yarn with factor, original_context_length, yarn_beta_fast/slow,
yarn_log_multiplier: kernels/rope.py), and its queries may carry Llama 4's attention
temperature (attention.temperature_scale β): q × (1 + β·log(1 + ⌊p / N⌋)), N the original
context length. That factor is exactly 1 below position N; tandem does not apply it past N
and refuses those positions with a clear error. (llama.cpp: src/models/mistral3.cpp.)

    h = norm(x);  x += o(attention(rope(q(h)), rope(k(h)), v(h)))
    h = norm(x);  x += down(silu(gate(h)) · up(h))
"""

from __future__ import annotations

import torch

from quant.errors import UnsupportedError
from runtime.models.llama import Llama


class Mistral3(Llama):
    architectures = ("mistral3",)

    def rope_tables(self, positions: torch.Tensor) -> dict[bool, tuple[torch.Tensor, ...]]:
        c = self.config
        if c.attn_temp_scale and positions.numel() and int(positions.max()) >= c.attn_temp_floor:
            raise UnsupportedError(
                f"mistral3's attention temperature applies from position {c.attn_temp_floor}; "
                f"tandem runs this model up to {c.attn_temp_floor} tokens of context "
                f"(set num_ctx ≤ {c.attn_temp_floor})"
            )
        return super().rope_tables(positions)
