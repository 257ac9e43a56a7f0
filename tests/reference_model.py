"""The tests' reference path: one sequence at a time over a contiguous KV cache.

`forward(model, tokens, start, cache)` runs a Model's layers with attention over a KVCache
(one slab per layer, on the CPU) instead of the paged pool, and `Generation` generates one
sequence on its own with it. The engine's paged, batched path (runtime/execution/model_runner.py) is
tested against these; perplexity is measured with them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from kernels.attention import attention, paged_decode_attention
from kernels.crossing import cross
from kernels.thread_policy import forward_threads
from loaders.config import ModelConfig
from runtime.engine.sequence import Delta, Sequence
from runtime.kv.kv_pool import BLOCK_SIZE
from runtime.models import Model
from runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from runtime.loaded_model import LoadedModel


class KVCache:
    """One sequence's keys and values, a contiguous slab per layer (CPU)."""

    def __init__(self, config: ModelConfig, n_ctx: int, dtype: torch.dtype = torch.float16):
        self.n_ctx = n_ctx
        self.dtype = dtype
        shape_k = (n_ctx, config.n_head_kv, config.head_dim)
        shape_v = (n_ctx, config.n_head_kv, config.head_dim_v)
        self.k = [torch.empty(shape_k, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape_v, dtype=dtype) for _ in range(config.n_layer)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k: (T, Hkv, D), v: (T, Hkv, Dv) stored at positions start … start+T-1
        end = start + k.shape[0]
        self.k[layer][start:end] = k
        self.v[layer][start:end] = v

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0 … end-1: (end, Hkv, D), (end, Hkv, Dv)."""
        return self.k[layer][:end].float(), self.v[layer][:end].float()


def forward(
    model: Model, tokens: torch.Tensor, start: int, cache: KVCache, all_logits: bool = False
) -> torch.Tensor:
    """tokens (T,) int64 at positions start … start+T-1 → logits (T or 1, V) float32. A GPU
    layer's keys and values cross to the CPU cache and back every call."""
    positions = torch.arange(start, start + tokens.shape[0])
    # One new token on an f16 cache: the native decode kernel, the contiguous slab read as
    # pages 0, 1, 2, … (a table of consecutive blocks).
    n = start + tokens.shape[0]
    blocks = -(-n // BLOCK_SIZE)
    paged = (
        tokens.shape[0] == 1 and cache.dtype == torch.float16 and blocks * BLOCK_SIZE <= cache.n_ctx
    )  # the kernel wants whole pages in the slab
    table = torch.arange(blocks, dtype=torch.int32)[None] if paged else None
    length = torch.tensor([n])
    scale, softcap = model.config.attn_scale, model.config.attn_softcap

    def attend(i, q, k, v, window):
        cache.write(i, start, k, v)
        sinks = getattr(model.layers[i], "sinks", None)  # gpt-oss's attention sinks
        if paged and model.layers[i].device.type == "cpu":
            out = paged_decode_attention(
                q, cache.k[i], cache.v[i], table, length, scale, window, softcap, sinks
            )
            if out is not None:
                return out
        keys, values = cache.read(i, n)  # the cache is on the CPU; a GPU layer's q is not
        keys, values = cross(keys, q.device), cross(values, q.device)
        return attention(q, keys, values, start, window, scale, softcap, sinks)

    with forward_threads(model.num_threads):
        x = model.run_layers(model.embed_rows(tokens), model.rope_tables(positions), attend)
        return model.logits(x if all_logits else x[-1:])


class Generation:
    """One sequence generated on its own over a KVCache; iterated for Deltas."""

    def __init__(
        self, lm: LoadedModel, prompt_ids: list[int], params: SamplingParams, n_ctx: int
    ) -> None:
        self.lm, self.n_ctx = lm, n_ctx
        self.seq = Sequence(0, prompt_ids, params, lm.tokenizer, n_ctx)
        self.timings = self.seq.timings

    @property
    def generated(self) -> list[int]:
        return self.seq.generated

    def __iter__(self) -> Iterator[Delta]:
        cache, seq, model = KVCache(self.lm.config, self.n_ctx), self.seq, self.lm.model
        with torch.inference_mode():
            start = time.perf_counter()
            logits = forward(model, torch.tensor(seq.token_ids), 0, cache)
            self.timings.prompt_seconds = time.perf_counter() - start
            start = time.perf_counter()
            while True:
                delta = seq.next(logits[-1])
                self.timings.eval_seconds = time.perf_counter() - start
                yield delta
                if delta.finish_reason:
                    return
                token = torch.tensor([delta.token_id])
                logits = forward(model, token, len(seq.token_ids) - 1, cache)
