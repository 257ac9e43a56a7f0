"""gpt-oss (llama.cpp's openai-moe): grouped-query attention with biases on q/k/v/o, a learned
per-head sink logit in every attention softmax, sliding-window (layer 0, 2, 4, …) and global
layers alternating, NEOX RoPE; a mixture-of-experts feed-forward (MXFP4 experts in the
released files) with biases, routed top-k → softmax (runtime/models/moe.py), and the clamped
SwiGLU x·σ(1.702x)·(y+1). The norm before the experts is the file's post_attention_norm.

    h = norm(x);  x += o(attention_sinks(rope(q(h)), rope(k(h)), v(h)))
    h = norm(x);  x += Σ_k w_k · down_k(swiglu_oai(gate_k(h), up_k(h)))

The released files scale RoPE by YaRN (rope.scaling.type = yarn, factor 32 over an original
context of 4k tokens): every layer's rope, the sliding-window layers' too (llama.cpp's openai-moe
sets rope_freq_scale_train_swa to the scale), with rope.freq_base_swa where the file has one.
"""

from __future__ import annotations

import torch

from kernels.linear import matmuls
from runtime.models.base import Model
from runtime.models.moe import MoE, MoELayer
from runtime.models.weights import WeightLoader


class GptOss(Model):
    architectures = ("gpt-oss",)
    swa_rope_scaled = True

    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> MoELayer:
        q, k, v = w.linears(
            [p + f"attn_{x}.weight" for x in "qkv"], [p + f"attn_{x}.bias" for x in "qkv"]
        )
        return MoELayer(
            attn_norm=w.vector(p + "attn_norm.weight", device),
            q=q,
            k=k,
            v=v,
            o=w.linear(p + "attn_output.weight", p + "attn_output.bias"),
            ffn_norm=w.vector(p + "post_attention_norm.weight", device),
            moe=MoE.load(w, p),
            sinks=w.vector(p + "attn_sinks.weight", device),
            device=device,
        )

    def layer_forward(self, i, b, x, h, rope, tables, window, attend):
        c, n, ops = self.config, x.shape[0], b.ops
        q, k, v = matmuls([b.q, b.k, b.v], h)
        q = q.view(n, c.n_head, c.head_dim)
        k = k.view(n, c.n_head_kv, c.head_dim)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        q, k = ops.rope_qk(q, k, *tables, rope.neox)
        x, h = ops.add_rms_norm(x, b.o(attend(i, q, k, v, window)), b.ffn_norm, c.rms_eps)
        assert isinstance(b, MoELayer) and b.moe is not None  # load_layer made it
        return x, b.moe(h, ops)
