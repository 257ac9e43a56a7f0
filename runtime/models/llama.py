"""The llama family — llama (incl. Llama 3.x's `rope_freqs`), mistral, qwen2 (q/k/v
biases): pre-norm layers of grouped-query attention with RoPE and a SwiGLU feed-forward.
The other architectures subclass it and change a step (runtime/models/qwen3.py, …).

    h = norm(x);  x += o(attention(rope(q(h)), rope(k(h)), v(h)))
    h = norm(x);  x += down(silu(gate(h)) · up(h))

Optional tensors read where present, as llama.cpp reads them: attn_output / ffn biases,
a fused attn_qkv (split into q, k, v at load).
"""

from __future__ import annotations

import torch

from kernels.linear import matmuls
from runtime.models.base import Layer, Model
from runtime.models.weights import WeightLoader


class Llama(Model):
    architectures = ("llama", "mistral", "qwen2")

    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> Layer:
        c = self.config
        q, k, v = self.load_qkv(w, p)
        gate, up = self.load_gate_up(w, p)
        return Layer(
            attn_norm=w.vector(p + "attn_norm.weight", device) if c.pre_norms else None,
            q=q,
            k=k,
            v=v,
            o=w.linear(p + "attn_output.weight", p + "attn_output.bias"),
            ffn_norm=w.vector(p + "ffn_norm.weight", device) if c.pre_norms else None,
            gate=gate,
            up=up,
            down=w.linear(p + "ffn_down.weight", p + "ffn_down.bias"),
            device=device,
        )

    def load_qkv(self, w: WeightLoader, p: str) -> list:
        c = self.config
        if c.fused_qkv:
            sizes = [c.n_head * c.head_dim, c.kv_dim, c.n_head_kv * c.head_dim_v]
            return w.split(p + "attn_qkv.weight", sizes, p + "attn_qkv.bias")
        return w.linears(
            [p + f"attn_{x}.weight" for x in "qkv"], [p + f"attn_{x}.bias" for x in "qkv"]
        )

    def load_gate_up(self, w: WeightLoader, p: str) -> list:
        if self.config.fused_gate_up:  # ffn_up's rows: the gate's, then the up's
            return w.split(p + "ffn_up.weight", [self.config.n_ff] * 2)
        return w.linears(
            [p + "ffn_gate.weight", p + "ffn_up.weight"], [p + "ffn_gate.bias", p + "ffn_up.bias"]
        )

    def qkv(self, i: int, b: Layer, h: torch.Tensor, rope, tables):
        """h (T, E) → q (T, H, D), k (T, Hkv, D) rotated (where layer i has rope), v."""
        c, n = self.config, h.shape[0]
        q, k, v = matmuls([b.q, b.k, b.v], h)
        q = q.view(n, c.n_head, c.head_dim)
        k = k.view(n, c.n_head_kv, c.head_dim)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        if b.q_norm is not None and b.k_norm is not None:  # per head (qwen3, gemma3)
            q = b.ops.rms_norm(q, b.q_norm, c.rms_eps)
            k = b.ops.rms_norm(k, b.k_norm, c.rms_eps)
        if c.has_rope(i):
            q, k = b.ops.rope_qk(q, k, *tables, rope.neox)
        return q, k, v

    def ffn(self, b: Layer, h: torch.Tensor) -> torch.Tensor:
        """h (T, E) → down(act(gate(h)) · up(h)) (T, E)."""
        gate, up = matmuls([b.gate, b.up], h)
        return b.down(b.ops.act_mul(gate, up, gelu=self.config.activation == "gelu_tanh"))

    def layer_forward(self, i, b, x, h, rope, tables, window, attend):
        c = self.config
        q, k, v = self.qkv(i, b, h, rope, tables)
        a = b.o(attend(i, q, k, v, window))  # (T, E)
        x, h = b.ops.add_rms_norm(x, a, b.ffn_norm, c.rms_eps)
        return x, self.ffn(b, h)
