"""phi3: the llama layer over fused weights — one attn_qkv tensor (q, k, v rows one after
another) and one ffn_up holding the gate's rows then the up's (SwiGLU over its halves) —
split into their parts at load; NEOX rope with LongRoPE's per-pair frequency factors
(rope_factors_short; base.Model.rope_factors) and its attention factor on cos/sin. Its
sliding window is read and dropped, as llama.cpp does. (llama.cpp: src/models/phi3.cpp.)

    h = norm(x);  q, k, v = split(qkv(h));  x += o(attention(rope(q), rope(k), v))
    h = norm(x);  g, u = split(up(h));  x += down(silu(g) · u)
"""

from __future__ import annotations

from runtime.models.llama import Llama


class Phi3(Llama):
    architectures = ("phi3",)
