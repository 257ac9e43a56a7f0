"""MoE: a mixture-of-experts feed-forward (qwen3moe, gpt-oss), as llama.cpp's build_moe_ffn.

    logits = router(h)                                  # (T, n_expert) (+ bias: gpt-oss)
    softmax gating:        p = softmax(logits); w, ids = top-k(p)          (qwen3moe)
    softmax_weight gating: l, ids = top-k(logits); w = softmax(l)          (gpt-oss)
    normalized (qwen3moe): w /= max(Σw, 2^-14)
    f = Σ_k w_k · down_{ids_k}(act(gate_{ids_k}(h), up_{ids_k}(h)))

The experts' matmuls (kernels/experts.py) take every (token, slot) row of the step at once,
grouped by expert, so each chosen expert's weights are read once per step. The experts may
sit on another device than the rest of the layer (`--n-cpu-moe`: experts in RAM on the CPU
kernels, attention and router on the GPU): the rows cross to them and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.crossing import cross
from kernels.experts import PackedExperts, expert_matmuls, route_topk, routed_ffn
from kernels.layer_ops import LayerOps
from runtime.models.base import Layer, Linear
from runtime.models.weights import WeightLoader

SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # gpt-oss's clamped SwiGLU (LLM_FFN_SWIGLU_OAI_MOE)
MIN_WEIGHT_SUM = 6.103515625e-5  # the clamp of the top-k weights' sum (smallest f16 normal)


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gpt-oss: x = min(gate, 7), y = clamp(up, ±7) → x · σ(1.702 x) · (y + 1)."""
    x = gate.clamp(max=SWIGLU_LIMIT)
    y = up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
    return x / (1.0 + torch.exp(-SWIGLU_ALPHA * x)) * (y + 1.0)


@dataclass
class MoE:
    """One layer's router and routed experts."""

    router: Linear  # (n_expert rows over E), with its bias where the file has one
    gate: PackedExperts  # (n_expert, F, E)
    up: PackedExperts
    down: PackedExperts  # (n_expert, E, F)
    n_used: int
    gating: str  # "softmax" | "softmax_weight"
    normalize: bool
    activation: str  # "silu" | "swiglu_oai"

    @classmethod
    def load(cls, w: WeightLoader, p: str) -> MoE:
        c = w.config
        bias = p + "ffn_gate_inp.bias"
        return cls(
            router=w.linear(p + "ffn_gate_inp.weight", bias if w.has(bias) else None),
            gate=w.experts(p + "ffn_gate_exps.weight", p + "ffn_gate_exps.bias"),
            up=w.experts(p + "ffn_up_exps.weight", p + "ffn_up_exps.bias"),
            down=w.experts(p + "ffn_down_exps.weight", p + "ffn_down_exps.bias"),
            n_used=c.n_expert_used,
            gating=c.expert_gating,
            normalize=c.expert_norm,
            activation=c.activation,
        )

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, E) → (weights (T, k) float32, expert ids (T, k) int64)."""
        native = route_topk(self.router, h, self.n_used, self.gating == "softmax", self.normalize)
        if native is not None:  # a float32 router on the CPU at decode: one native call
            return native
        logits = self.router(h)  # (T, n_expert)
        if self.gating == "softmax":
            weights, ids = torch.topk(torch.softmax(logits, -1), self.n_used, -1)
        else:
            top, ids = torch.topk(logits, self.n_used, -1)
            weights = torch.softmax(top, -1)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=MIN_WEIGHT_SUM)
        return weights, ids

    def __call__(self, h: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        """h (T, E), the feed-forward's normed input → its output (T, E) on h's device."""
        n, k = h.shape[0], self.n_used
        weights, ids = self.route(h)
        where = self.gate.device  # the experts' device (CPU in a --n-cpu-moe split)
        x, ids = cross(h, where), cross(ids, where)
        fused = routed_ffn(
            self.gate, self.up, self.down, x, ids, cross(weights, where), self.activation
        )
        if fused is not None:  # the CPU panels: the whole feed-forward in one native call
            return cross(fused, h.device)
        expert = ids.reshape(-1)  # (T·k,) row t·k + j: token t's j-th choice
        src = torch.arange(n, device=where).repeat_interleave(k)
        gate, up = expert_matmuls([self.gate, self.up], x, src, expert)  # (T·k, F) each
        if self.activation == "swiglu_oai":
            act = swiglu_oai(gate, up)
        elif self.gate.triton == (ops.name == "triton"):  # the experts run where the layer does
            act = ops.act_mul(gate, up, gelu=False)
        else:
            act = torch.nn.functional.silu(gate) * up
        rows = torch.arange(n * k, device=where)
        out = expert_matmuls([self.down], act, rows, expert)[0]  # (T·k, E)
        out = cross(out, h.device).view(n, k, -1)
        return torch.einsum("tke,tk->te", out, weights)


@dataclass
class MoELayer(Layer):
    """A transformer layer whose feed-forward is a mixture of experts (no dense gate/up/down)."""

    gate: None = None  # pyright: ignore[reportIncompatibleVariableOverride]
    up: None = None  # pyright: ignore[reportIncompatibleVariableOverride]
    down: None = None  # pyright: ignore[reportIncompatibleVariableOverride]
    moe: MoE | None = None
    sinks: torch.Tensor | None = None  # (H,) attention sinks (gpt-oss)
