"""Embedder: one pooled, L2-normalised vector per prompt from a loaded model — a prefill with
no KV kept: the prompts are packed into one forward whose attention runs over each prompt's
own keys (causal, the sliding window where a layer has one), never touching the KV pool;
recurrent layers (qwen35) run each prompt from a fresh state that is dropped after.

    embedder = Embedder(lm)
    vectors = embedder.embed([[1, 2, 3], [4, 5]])   # (B, E) float32, each of norm 1

Pooling is the GGUF's `{arch}.pooling_type` (llama.cpp's numbering: 1 mean, 2 cls, 3 last),
else the mean over the final hidden states (after the output norm), as ollama does for a model
that names none. The Engine thread runs it between decode steps (runtime/engine/engine.py),
so it never races the engine's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.thread_policy import forward_threads
from quant.errors import UnsupportedError
from runtime.kv.recurrent_state import RecurrentStep, Run, SeqState
from runtime.loaded_model import LoadedModel

CHUNK_TOKENS = 4096  # tokens one forward packs
POOLING = {0: "mean", 1: "mean", 2: "cls", 3: "last"}  # 0 (none): a sentence vector anyway


def pooling_of(lm: LoadedModel) -> str:
    value = lm.gguf.metadata.get(f"{lm.config.arch}.pooling_type")
    if value is None:
        return "mean"
    if value not in POOLING:
        raise UnsupportedError(f"pooling type {value} (rank) gives no embedding; use another model")
    return POOLING[int(value)]


class _OwnKeys:
    """attend(i, q (T, H, D), k (T, Hkv, D), v (T, Hkv, Dv), window) → (T, H * Dv), each
    packed prompt attending only to its own earlier tokens."""

    def __init__(self, lengths: list[int], scale: float, causal: bool = True) -> None:
        self.lengths, self.scale, self.causal = lengths, scale, causal
        # recurrent layers (qwen35's delta nets): each prompt from a fresh state, then dropped
        rows = [sum(lengths[:i]) for i in range(len(lengths))]
        self.recurrent = RecurrentStep(
            tuple(Run(row, n, SeqState()) for row, n in zip(rows, lengths, strict=True))
        )

    def __call__(self, layer: int, q, k, v, window: int) -> torch.Tensor:
        out, start = [], 0
        for n in self.lengths:
            qs, ks, vs = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))
            groups = qs.shape[0] // ks.shape[0]
            if groups > 1:  # grouped-query attention: each kv head serves `groups` q heads
                ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
            mask = None
            if self.causal:
                pos = torch.arange(n, device=q.device)
                gap = pos[:, None] - pos[None, :]  # (n, n) query - key
                keep = gap >= 0
                if window:
                    keep &= gap < window
                mask = keep
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale)
            out.append(o.transpose(0, 1).reshape(n, -1))  # (n, H * Dv)
            start += n
        return torch.cat(out).to(q.dtype)


class Embedder:
    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.pooling = pooling_of(lm)

    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        """prompts: token ids, each non-empty → (B, E) float32 unit vectors, on the CPU;
        forwards of at most CHUNK_TOKENS tokens (or one prompt)."""
        out, chunk, size = [], [], 0
        for ids in prompts:
            if chunk and size + len(ids) > CHUNK_TOKENS:
                out.append(self._forward(chunk))
                chunk, size = [], 0
            chunk.append(ids)
            size += len(ids)
        out.append(self._forward(chunk))
        return torch.cat(out)

    def _forward(self, prompts: list[list[int]]) -> torch.Tensor:
        model = self.lm.model
        encode = getattr(model, "encode", None)  # an encoder (BERT) pools its own way
        lengths = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)  # (T,)
        positions = torch.cat([torch.arange(n) for n in lengths])  # (T,)
        with torch.inference_mode(), forward_threads(model.num_threads):
            if encode is not None:
                hidden = encode(tokens, positions, lengths)  # (T, E)
            else:
                attend = _OwnKeys(lengths, model.config.attn_scale)
                x = model.run_layers(model.embed_rows(tokens), model.rope_tables(positions), attend)
                hidden = model.head_ops.rms_norm(x, model.output_norm, model.config.rms_eps)
            hidden = hidden.float().cpu()
        pooled = torch.stack([self._pool(h) for h in hidden.split(lengths)])  # (B, E)
        return F.normalize(pooled, dim=-1)

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        """h (n, E) → (E,)"""
        if self.pooling == "cls":
            return h[0]
        if self.pooling == "last":
            return h[-1]
        return h.mean(0)
