"""BERT, as llama.cpp's src/models/bert.cpp runs it: an encoder that makes embeddings (no
LM head; chat and generation refuse it). Learned absolute positions, token type 0 ("sentence
A") added to every token, a LayerNorm over the embeddings, then post-norm layers whose
attention sees every token of its own prompt (non-causal unless the GGUF says causal).

    x = norm(tok[t] + types[0] + pos[p])
    x = norm(x + o(attention(q(x), k(x), v(x))))
    x = norm(x + down(gelu(up(x))))

Every matrix carries a bias where the file has one; norms are LayerNorms with biases
(epsilon `bert.attention.layer_norm_epsilon`); GELU is ggml's (the tanh approximation).
The embedder (runtime/engine/embedder.py) calls `encode` and pools the final hidden states
as the GGUF's pooling_type says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.crossing import cross
from kernels.linear import matmuls
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from quant.errors import UnsupportedError
from runtime.models.base import Layer, Linear, Model
from runtime.models.weights import WeightLoader
from runtime.placement.device_map import CPU, DeviceMap

Norm = tuple[torch.Tensor, torch.Tensor]  # LayerNorm weight, bias (E,)


@dataclass
class EncoderLayer:
    """One post-norm BERT layer's weights, on `device`."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    attn_out_norm: Norm
    up: Linear
    down: Linear
    out_norm: Norm
    device: torch.device


class Bert(Model):
    architectures = ("bert",)

    def __init__(
        self, gguf: GGUFFile, config: ModelConfig, devices: DeviceMap | None = None
    ) -> None:
        self.config = c = config
        self.devices = devices = devices or DeviceMap.cpu_only(c.n_layer)
        self.weight_bytes = gguf.file_size - gguf.data_offset
        w = WeightLoader(gguf, config, devices)
        cpu = torch.device("cpu")
        # Lookups run on the CPU: rows only, no panels.
        self.embed = w.linear("token_embd.weight", where=CPU, panels=False)
        self.pos_embd = w.linear("position_embd.weight", where=CPU, panels=False)
        types = (
            w.linear("token_types.weight", where=CPU, panels=False)
            if w.has("token_types.weight")
            else None
        )
        zero = torch.zeros(1, dtype=torch.int64)
        self.type_row = types.rows(zero)[0] if types is not None else None  # (E,) type 0
        self.embed_norm = self._norm(w, "token_embd_norm", cpu)
        self.head_device = devices.device(devices.head)
        self.layers: list[Layer] = []  # no decoder layers: the KV pool stays unused
        self.blocks = [
            self._load_block(w, f"blk.{i}.", devices.device(where))
            for i, where in enumerate(devices.layers)
        ]

    @staticmethod
    def _norm(w: WeightLoader, name: str, device: torch.device) -> Norm:
        return w.vector(name + ".weight", device), w.vector(name + ".bias", device)

    def _load_block(self, w: WeightLoader, p: str, device: torch.device) -> EncoderLayer:
        if self.config.fused_qkv:
            kv = self.config.kv_dim
            q, k, v = w.split(
                p + "attn_qkv.weight", [self.config.n_embd, kv, kv], p + "attn_qkv.bias"
            )
        else:
            q, k, v = w.linears(
                [p + f"attn_{x}.weight" for x in "qkv"], [p + f"attn_{x}.bias" for x in "qkv"]
            )
        return EncoderLayer(
            q=q,
            k=k,
            v=v,
            o=w.linear(p + "attn_output.weight", p + "attn_output.bias"),
            attn_out_norm=self._norm(w, p + "attn_output_norm", device),
            up=w.linear(p + "ffn_up.weight", p + "ffn_up.bias"),
            down=w.linear(p + "ffn_down.weight", p + "ffn_down.bias"),
            out_norm=self._norm(w, p + "layer_output_norm", device),
            device=device,
        )

    # ---- the encoder ---------------------------------------------------------------
    def encode(
        self, tokens: torch.Tensor, positions: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        """tokens, positions (T,) of prompts packed back to back (`lengths` tokens each) →
        the final hidden states (T, E), on the head's device."""
        c = self.config
        if int(positions.max()) >= c.n_ctx_train:
            raise UnsupportedError(
                f"a {c.arch} prompt holds at most {c.n_ctx_train} tokens (its learned "
                "positions); shorten the input"
            )
        x = self.embed.rows(tokens) + self.pos_embd.rows(positions)  # (T, E)
        if self.type_row is not None:
            x = x + self.type_row
        x = self._layer_norm(x, self.embed_norm)
        for b in self.blocks:
            x = self._block(b, cross(x, b.device), lengths)
        return cross(x, self.head_device)

    def _layer_norm(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], norm[0], norm[1], self.config.layer_norm_eps)

    def _block(self, b: EncoderLayer, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        c, n = self.config, x.shape[0]
        q, k, v = matmuls([b.q, b.k, b.v], x)
        a = self._attend(
            q.view(n, c.n_head, c.head_dim),
            k.view(n, c.n_head_kv, c.head_dim),
            v.view(n, c.n_head_kv, c.head_dim_v),
            lengths,
        )
        x = self._layer_norm(x + b.o(a), b.attn_out_norm)
        f = b.down(F.gelu(b.up(x), approximate="tanh"))
        return self._layer_norm(x + f, b.out_norm)

    def _attend(self, q, k, v, lengths: list[int]) -> torch.Tensor:
        """q (T, H, D), k (T, Hkv, D), v (T, Hkv, Dv) → (T, H * Dv): each packed prompt
        attends over its own tokens only, all at once, padded to the longest (B, H, L, D)."""
        c, device = self.config, q.device
        lens = torch.tensor(lengths, device=device)
        batch = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)  # (T,)
        starts = torch.cumsum(lens, 0) - lens
        col = torch.arange(q.shape[0], device=device) - starts[batch]  # (T,) place in prompt
        longest = max(lengths)

        def padded(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(len(lengths), longest, *t.shape[1:])  # (B, L, H, D)
            out[batch, col] = t
            heads = out.transpose(1, 2).float()  # (B, H, L, D)
            groups = c.n_head // t.shape[1]  # grouped-query: each kv head serves `groups`
            return heads.repeat_interleave(groups, 1) if groups > 1 else heads

        keep = torch.arange(longest, device=device)[None, :] < lens[:, None]  # (B, L) keys
        mask = keep[:, None, None, :]  # (B, 1, 1, L)
        if c.causal:
            mask = mask & torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        o = F.scaled_dot_product_attention(
            padded(q), padded(k), padded(v), attn_mask=mask, scale=c.attn_scale
        )  # (B, H, L, Dv)
        return o.transpose(1, 2)[batch, col].reshape(q.shape[0], -1).to(q.dtype)

    # ---- what a decoder has and an encoder does not ---------------------------------
    def run_layers(self, x, tables, attend):
        raise self.no_generation()

    def logits(self, x):
        raise self.no_generation()

    def no_generation(self) -> UnsupportedError:
        return UnsupportedError(
            f"{self.config.arch} is an embedding model: it has no language-model head and "
            "cannot chat or generate; ask it for embeddings (/v1/embeddings, /api/embed)"
        )
