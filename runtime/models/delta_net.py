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

A sequence's state is its last K-1 mixes (before the conv) and S, both zero at position 0;
RecurrentStep (runtime/kv/recurrent_state.py) hands each sequence's in, the layer puts the
new ones back. A decode takes the plain per-token form (delta_rule), a prefill the chunked
one (delta_rule_chunked: a triangular solve per 64 tokens, in torch; native / Triton
kernels are issue 18's part 3); sequences with the same number of new tokens in a step
(every decode) run together, batched over sequences and heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.layer_ops import LayerOps
from kernels.linear import matmuls
from runtime.kv.recurrent_state import RecurrentStep, Run
from runtime.models.base import Linear
from runtime.models.weights import WeightLoader

CHUNK = 64  # tokens per step of the chunked form
CHUNKED_FROM = 2  # runs of this many new tokens or more take the chunked form


@dataclass
class DeltaNet:
    qkv: Linear  # attn_qkv: the mix, C rows over E
    z: Linear  # attn_gate: the output gate, Hv·Dv rows
    beta: Linear  # ssm_beta: Hv rows
    alpha: Linear  # ssm_alpha: Hv rows
    conv: torch.Tensor  # (C, K) float32: ssm_conv1d
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
            conv=w.vector(p + "ssm_conv1d.weight", device).view(channels, c.ssm_conv),
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
        o = torch.empty(h.shape[0], self.v_heads, self.head_dim, device=h.device)
        for runs in _by_length(step.runs):
            rows = torch.cat([torch.arange(r.row, r.row + r.n) for r in runs]).to(h.device)
            n = runs[0].n
            window, state = self._states(i, runs, h.device)
            o[rows] = self._sequences(
                mix[rows].view(len(runs), n, -1),
                beta[rows].view(len(runs), n, -1),
                g[rows].view(len(runs), n, -1),
                window,
                state,
                runs,
                i,
            ).flatten(0, 1)
        y = ops.rms_norm(o, self.norm, self.eps) * F.silu(z).view_as(o)  # (T, Hv, Dv)
        return self.out(y.flatten(1))

    def _states(
        self, i: int, runs: list[Run], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The runs' states in layer i, stacked: windows (B, K-1, C), S (B, Hv, Dv, Dk)."""
        fresh = (
            torch.zeros(self.conv.shape[1] - 1, self.conv.shape[0], device=device),
            torch.zeros(self.v_heads, self.head_dim, self.head_dim, device=device),
        )
        held = [r.state.layers.get(i, fresh) for r in runs]
        return torch.stack([s[0] for s in held]), torch.stack([s[1] for s in held])

    def _sequences(
        self,
        mix: torch.Tensor,
        beta: torch.Tensor,
        g: torch.Tensor,
        window: torch.Tensor,
        state: torch.Tensor,
        runs: list[Run],
        i: int,
    ) -> torch.Tensor:
        """B sequences of n new tokens each: mix (B, n, C), beta and g (B, n, Hv), their
        windows and S → o (B, n, Hv, Dv); their new states are put back in `runs`."""
        b, n, _ = mix.shape
        x = torch.cat([window, mix], dim=1)  # (B, K-1+n, C)
        k_width = self.conv.shape[1]
        conv = (x.unfold(1, k_width, 1) * self.conv).sum(-1)  # (B, n, C)
        conv = F.silu(conv)
        key_dim = self.k_heads * self.head_dim
        q, k, v = conv.split([key_dim, key_dim, conv.shape[-1] - 2 * key_dim], dim=-1)
        q = self._heads(q.reshape(b, n, self.k_heads, self.head_dim))
        k = self._heads(k.reshape(b, n, self.k_heads, self.head_dim))
        v = v.reshape(b, n, self.v_heads, self.head_dim)
        rule = delta_rule_chunked if n >= CHUNKED_FROM else delta_rule
        o, state = rule(q, k, v, g, beta, state)
        for j, r in enumerate(runs):
            r.state.layers[i] = (x[j, x.shape[1] - (k_width - 1) :].clone(), state[j])
        return o

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, Hk, Dk) → L2-normalised per head, tiled to (B, n, Hv, Dk) (head h: h mod Hk)."""
        x = x * torch.rsqrt((x * x).sum(-1, keepdim=True) + self.eps)
        return x.repeat(1, 1, self.v_heads // self.k_heads, 1)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, token by token: q, k (B, n, H, Dk), v (B, n, H, Dv), g and beta
    (B, n, H), state S (B, H, Dv, Dk) → (o (B, n, H, Dv), the final S)."""
    scale = q.shape[-1] ** -0.5
    out = []
    s = state
    for t in range(q.shape[1]):
        s = s * torch.exp(g[:, t])[..., None, None]
        kt = k[:, t]  # (B, H, Dk)
        d = (v[:, t] - (s @ kt[..., None])[..., 0]) * beta[:, t, :, None]  # (B, H, Dv)
        s = s + d[..., None] * kt[..., None, :]
        out.append((s @ q[:, t, :, :, None])[..., 0] * scale)
    return torch.stack(out, dim=1), s


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta_rule's result, `chunk` tokens at a time (the chunked form flash-linear-attention
    and llama.cpp's build_delta_net_chunking compute). Within a chunk, with G_t = Σ_{j≤t} g_j
    and S0 the state before it, each token's update u_t = β_t (v_t − S'_t k_t) solves the
    unit lower-triangular system
        u_t + β_t Σ_{j<t} e^{G_t−G_j} (k_t·k_j) u_j = β_t (v_t − e^{G_t} S0 k_t)
    and then o_t = (e^{G_t} S0 q_t + Σ_{j≤t} e^{G_t−G_j} (q_t·k_j) u_j) / √Dk and the state
    after it S = e^{G_C} S0 + Σ_j e^{G_C−G_j} u_j k_jᵀ. Shapes as delta_rule's."""
    scale = q.shape[-1] ** -0.5
    out, s = [], state
    for first in range(0, q.shape[1], chunk):
        # (B, H, C, …): this chunk's tokens, heads first
        qc, kc, vc = (x[:, first : first + chunk].transpose(1, 2) for x in (q, k, v))
        gc, bc = (x[:, first : first + chunk].transpose(1, 2) for x in (g, beta))
        cum = gc.cumsum(-1)  # (B, H, C): G_t
        n = cum.shape[-1]
        on_or_below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        # (B, H, C, C): e^{G_t − G_j} for j ≤ t, 0 above (never exp of a positive exponent)
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~on_or_below, -torch.inf).exp()
        grow = cum.exp()[..., None]  # (B, H, C, 1): e^{G_t}
        a = (bc[..., None] * decay * (kc @ kc.transpose(-1, -2))).tril(-1)
        rhs = bc[..., None] * (vc - grow * (kc @ s.transpose(-1, -2)))  # (B, H, C, Dv)
        eye = torch.eye(n, device=q.device, dtype=q.dtype)
        u = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
        qk = (qc @ kc.transpose(-1, -2)) * decay  # (B, H, C, C)
        o = (grow * (qc @ s.transpose(-1, -2)) + qk @ u) * scale  # (B, H, C, Dv)
        last = cum[..., -1:]  # (B, H, 1)
        carry = (last - cum).exp()[..., None] * u  # (B, H, C, Dv): e^{G_C − G_j} u_j
        s = last.exp()[..., None] * s + carry.transpose(-1, -2) @ kc  # (B, H, Dv, Dk)
        out.append(o.transpose(1, 2))
    return torch.cat(out, dim=1), s


def _by_length(runs: tuple[Run, ...]) -> list[list[Run]]:
    """The runs grouped by their number of new tokens (every decode in one group)."""
    groups: dict[int, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.n, []).append(r)
    return list(groups.values())
