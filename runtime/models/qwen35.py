"""qwen35 (Qwen3.5 dense): three of every four layers (all but each full_attention_interval-th)
a gated delta net (runtime/models/delta_net.py), the others gated attention; every layer
then a post-attention norm and a SwiGLU feed-forward. (llama.cpp: src/models/qwen35.cpp.)

    h = norm(x);  x += delta_net(h)                                          (linear layers)
    h = norm(x);  q, gate = q(h) per head;  q, k = qnorm(q), knorm(k(h))     (attention)
                  x += o(attention(rope(q), rope(k), v(h)) · σ(gate))
    h = post_attention_norm(x);  x += down(silu(gate(h)) · up(h))

The rope rotates the first rope.dimension_count dims of a head (NEOX halves within them) by
llama.cpp's interleaved M-RoPE: pair i takes position section i mod 3 (t, h, w) while within
3 × that section's size, else section e; a text token's positions are (p, p, p, 0), so the
pairs of t, h and w rotate by p and any others not at all. The delta nets' per-sequence state
lives in the ModelRunner (runtime/kv/recurrent_state.py), handed over as `attend.recurrent`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.linear import matmuls
from kernels.rope import Rope
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from quant.errors import InternalError
from runtime.models.base import Layer, Linear
from runtime.models.delta_net import DeltaNet
from runtime.models.llama import Llama
from runtime.models.moe import MoE
from runtime.models.weights import WeightLoader
from runtime.placement.device_map import DeviceMap


@dataclass
class Qwen35Layer(Layer):
    """A qwen35 layer: attention's q/k/v/o, or (q/k/v/o None) a delta net; qwen35moe's
    gate/up/down are its shared expert, beside its routed experts and the shared gate."""

    q: Linear | None  # pyright: ignore[reportIncompatibleVariableOverride]
    k: Linear | None  # pyright: ignore[reportIncompatibleVariableOverride]
    v: Linear | None  # pyright: ignore[reportIncompatibleVariableOverride]
    o: Linear | None  # pyright: ignore[reportIncompatibleVariableOverride]
    delta: DeltaNet | None = None
    moe: MoE | None = None  # qwen35moe's routed experts
    shared_gate: torch.Tensor | None = None  # (E,) qwen35moe: σ(h · it) scales the shared expert


class Qwen35(Llama):
    architectures = ("qwen35",)

    def __init__(
        self, gguf: GGUFFile, config: ModelConfig, devices: DeviceMap | None = None
    ) -> None:
        super().__init__(gguf, config, devices)
        c = config
        self.rope = Rope(c.rope_dim or c.head_dim, c.rope_base, True, c.rope_scale)
        self.rotated = imrope_pairs(c.rope_sections, (c.rope_dim or c.head_dim) // 2)

    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> Layer:
        c = self.config
        gate, up = self.load_gate_up(w, p)
        attention = not c.recurrent_layers[i]
        q, k, v = (
            w.linears([p + f"attn_{x}.weight" for x in "qkv"], [None] * 3)
            if attention
            else (None, None, None)
        )
        return Qwen35Layer(
            attn_norm=w.vector(p + "attn_norm.weight", device),
            q=q,
            k=k,
            v=v,
            o=w.linear(p + "attn_output.weight") if attention else None,
            ffn_norm=w.vector(p + "post_attention_norm.weight", device),
            gate=gate,
            up=up,
            down=self.load_down(w, p),
            q_norm=w.vector(p + "attn_q_norm.weight", device) if attention else None,
            k_norm=w.vector(p + "attn_k_norm.weight", device) if attention else None,
            device=device,
            delta=None if attention else DeltaNet.load(w, p, device),
        )

    def load_down(self, w: WeightLoader, p: str) -> Linear:
        return w.linear(p + "ffn_down.weight")

    def rope_tables(self, positions: torch.Tensor) -> dict[bool, tuple[torch.Tensor, ...]]:
        """positions (T,) → {False: (cos, sin) (T, 1, D_rot/2)}: pairs of no text section
        stay unrotated (cos 1, sin 0)."""
        cos, sin = self.rope.tables(positions)
        keep = self.rotated
        return {False: (torch.where(keep, cos, 1.0), torch.where(keep, sin, 0.0))}

    def layer_forward(self, i, b, x, h, rope, tables, window, attend):
        c = self.config
        if b.delta is not None:
            step = getattr(attend, "recurrent", None)
            if step is None:
                raise InternalError(
                    f"{c.arch} layer {i} is recurrent: it runs only through a ModelRunner, "
                    "which keeps each sequence's state"
                )
            a = b.delta(i, h, step, b.ops)
        else:
            a = self.gated_attention(i, b, h, tables, window, attend)
        x, h = b.ops.add_rms_norm(x, a, b.ffn_norm, c.rms_eps)
        return x, self.ffn(b, h)

    def gated_attention(self, i, b, h, tables, window, attend) -> torch.Tensor:
        """h (T, E) → o(attention · σ(gate)) (T, E): q's rows hold each head's query, then
        its gate; QK-norm per head, partial rope."""
        c, n, ops = self.config, h.shape[0], b.ops
        qg, k, v = matmuls([b.q, b.k, b.v], h)
        qg = qg.view(n, c.n_head, 2, c.head_dim)
        q = ops.rms_norm(qg[:, :, 0].contiguous(), b.q_norm, c.rms_eps)  # (T, H, D)
        gate = qg[:, :, 1].reshape(n, c.n_head * c.head_dim)
        k = ops.rms_norm(k.view(n, c.n_head_kv, c.head_dim), b.k_norm, c.rms_eps)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        q, k = self.partial_rope(b, q, k, tables)
        return b.o(attend(i, q, k, v, window) * torch.sigmoid(gate))

    def partial_rope(self, b, q, k, tables) -> tuple[torch.Tensor, torch.Tensor]:
        """The first D_rot dims of every head rotated (NEOX), the rest as they are."""
        d = self.config.rope_dim or self.config.head_dim
        if d == q.shape[-1]:
            return b.ops.rope_qk(q, k, *tables, True)
        rq, rk = b.ops.rope_qk(q[..., :d].contiguous(), k[..., :d].contiguous(), *tables, True)
        return torch.cat([rq, q[..., d:]], -1), torch.cat([rk, k[..., d:]], -1)


def imrope_pairs(sections: tuple[int, ...], pairs: int) -> torch.Tensor:
    """(pairs,) bool: the rotated pairs whose interleaved-M-RoPE section is t, h or w (a text
    token's position p; section e's position is 0)."""
    s = (tuple(sections) + (0, 0, 0, 0))[:4]
    total = sum(s) or 1
    sector = torch.arange(pairs) % total
    mod = sector % 3
    return (
        ((mod == 0) & (sector < 3 * s[0]))
        | ((mod == 1) & (sector < 3 * s[1]))
        | ((mod == 2) & (sector < 3 * s[2]))
    )
