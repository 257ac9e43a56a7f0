"""DeltaNet: a gated delta net, qwen35's linear-attention layer, as llama.cpp computes it
(src/models/qwen35.cpp build_layer_attn_linear, delta-net-base.cpp, ggml's
gated_delta_net and ssm_conv). Per token t of a sequence, on the layer's normed input h:

    mix = qkv(h)  (C = 2·Hk·Dk + Hv·Dv channels)     z = gate(h)  (Hv·Dv)
    mix = silu(causal_conv1d(mix))                   # kernel K over the last K-1 mixes too
    q, k, v = split(mix)                             # (Hk, Dk), (Hk, Dk), (Hv, Dv)
    q, k = q / ‖q‖, k / ‖k‖  (per head; ‖x‖ = √(Σx² + eps)), tiled to Hv heads: h ← h mod Hk
    β = σ(beta(h)),  g = softplus(alpha(h) + dt_bias) · a        (Hv,)   a = -exp(A_log) < 0
    S = S · exp(g);  S += β (v − S k) kᵀ;  o = S q / √Dk         S: (Hv, Dv, Dk) per sequence
    out = ssm_out(rms_norm(o) · norm · silu(z))

The conv, silu and q/k norms are one call (kernels/short_conv.py: native on the CPU). A
sequence's state is its last K-1 mixes (before the conv) and S, both zero at position 0;
RecurrentStep (runtime/kv/recurrent_state.py) hands each sequence's in, the layer puts the
new ones back. The recurrence is the layer's ops.delta_rule (kernels/layer_ops.py): on a CPU
layer the native kernel (kernels/native/delta_rule.cpp; torch's per-token or chunked form
without it, kernels/delta_rule.py), on a GPU layer Triton's (kernels/triton/delta_rule.py),
each updating the sequences' S in place. Sequences with the same number of new tokens in a
step (every decode) run together, batched over sequences and heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.layer_ops import LayerOps
from kernels.linear import matmuls
from kernels.short_conv import short_conv
from runtime.kv.recurrent_state import RecurrentStep, Run
from runtime.models.base import Linear
from runtime.models.weights import WeightLoader


@dataclass
class DeltaNet:
    qkv: Linear  # attn_qkv: the mix, C rows over E
    z: Linear  # attn_gate: the output gate, Hv·Dv rows
    beta: Linear  # ssm_beta: Hv rows
    alpha: Linear  # ssm_alpha: Hv rows
    taps: torch.Tensor  # (K, C) float32: ssm_conv1d (C, K), transposed
    dt_bias: torch.Tensor  # (Hv,)
    a: torch.Tensor  # (Hv,) the decay rate, negative (ssm_a = -exp(A_log))
    norm: torch.Tensor  # (Dv,) ssm_norm
    out: Linear  # ssm_out: E rows over Hv·Dv
    k_heads: int
    v_heads: int
    head_dim: int  # Dk = Dv (ssm.state_size)
    eps: float

    @classmethod
    def load(cls, w: WeightLoader, p: str, device: torch.device) -> DeltaNet:
        c = w.config
        qkv, z, beta, alpha = w.linears(
            [p + "attn_qkv.weight", p + "attn_gate.weight"]
            + [p + "ssm_beta.weight", p + "ssm_alpha.weight"],
            [None] * 4,
        )
        channels = 2 * c.ssm_k_heads * c.ssm_state + c.ssm_inner
        return cls(
            qkv=qkv,
            z=z,
            beta=beta,
            alpha=alpha,
            taps=w.vector(p + "ssm_conv1d.weight", device)
            .view(channels, c.ssm_conv)
            .t()
            .contiguous(),
            dt_bias=w.vector(p + "ssm_dt.bias", device),
            a=w.vector(p + "ssm_a", device),
            norm=w.vector(p + "ssm_norm.weight", device),
            out=w.linear(p + "ssm_out.weight"),
            k_heads=c.ssm_k_heads,
            v_heads=c.ssm_v_heads,
            head_dim=c.ssm_state,
            eps=c.rms_eps,
        )

    def __call__(self, i: int, h: torch.Tensor, step: RecurrentStep, ops: LayerOps) -> torch.Tensor:
        """Layer i on h (T, E), the step's rows whose sequences `step` lists → (T, E)."""
        mix, z, beta, alpha = matmuls([self.qkv, self.z, self.beta, self.alpha], h)
        beta = torch.sigmoid(beta)  # (T, Hv)
        g = F.softplus(alpha + self.dt_bias) * self.a  # (T, Hv)
        groups = _by_length(step.runs)
        runs = groups[0]
        if len(groups) == 1 and runs[0].row == 0 and len(runs) * runs[0].n == h.shape[0]:
            # every run of one length (a decode step; one prefill), in row order, covering the
            # rows: no gathering or scattering
            shape = (len(runs), runs[0].n, -1)
            o = self._sequences(
                mix.reshape(shape), beta.reshape(shape), g.reshape(shape), runs, i, ops
            )
            o = o.flatten(0, 1)
        else:
            o = torch.empty(h.shape[0], self.v_heads, self.head_dim, device=h.device)
            for runs in groups:
                rows = torch.cat([torch.arange(r.row, r.row + r.n) for r in runs]).to(h.device)
                shape = (len(runs), runs[0].n, -1)
                o[rows] = self._sequences(
                    mix[rows].view(shape), beta[rows].view(shape), g[rows].view(shape), runs, i, ops
                ).flatten(0, 1)
        y = ops.rms_norm(o, self.norm, self.eps) * F.silu(z).view_as(o)  # (T, Hv, Dv)
        return self.out(y.flatten(1))

    def _states(
        self, i: int, runs: list[Run], device: torch.device
    ) -> list[tuple[torch.Tensor, ...]]:
        """Each run's state in layer i: its window (K-1, C) and S (Hv, Dv, Dk), zeros for a
        sequence at position 0."""
        return [
            r.state.layers.get(i)
            or (
                torch.zeros(self.taps.shape[0] - 1, self.taps.shape[1], device=device),
                torch.zeros(self.v_heads, self.head_dim, self.head_dim, device=device),
            )
            for r in runs
        ]

    def _sequences(
        self,
        mix: torch.Tensor,
        beta: torch.Tensor,
        g: torch.Tensor,
        runs: list[Run],
        i: int,
        ops: LayerOps,
    ) -> torch.Tensor:
        """B sequences of n new tokens each: mix (B, n, C), beta and g (B, n, Hv) → o (B, n,
        Hv, Dv); their new states are put back in `runs` (S updated in place by the rule)."""
        held = self._states(i, runs, mix.device)
        x = torch.cat([torch.stack([s[0] for s in held]), mix], dim=1)  # (B, K-1+n, C)
        heads = (self.k_heads, self.v_heads, self.head_dim)
        q, k, v = short_conv(x, self.taps, *heads, self.eps)  # (B, n, Hk | Hk | Hv, D)
        k_width = self.taps.shape[0]
        states = [s[1] for s in held]
        starts = [r.start for r in runs]  # where each one's chunks of the native rule fall
        o = ops.delta_rule(q, k, v, g, beta, states, starts)  # head h reads q/k head h mod Hk
        for j, r in enumerate(runs):
            r.state.layers[i] = (x[j, x.shape[1] - (k_width - 1) :].clone(), states[j])
        return o


def _by_length(runs: tuple[Run, ...]) -> list[list[Run]]:
    """The runs grouped by their number of new tokens (every decode in one group)."""
    groups: dict[int, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.n, []).append(r)
    return list(groups.values())
