"""Generation: one sequence generated on its own, over a contiguous KVCache.

`Generation(lm, prompt_ids, params, n_ctx)` is iterated for Deltas (see runtime.sequence).
The engine (runtime.llm_engine) is what `tandem run`, LLM and the server use; this simple
loop remains as the reference the engine's outputs are tested against.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from runtime.kv_cache import KVCache
from runtime.loaded_model import LoadedModel
from runtime.sampling_params import SamplingParams
from runtime.sequence import Delta, Sequence, Timings

__all__ = ["Delta", "Generation", "Timings"]


class Generation:
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
        cache, seq = KVCache(self.lm.config, self.n_ctx), self.seq
        with torch.inference_mode():
            start = time.perf_counter()
            logits = self.lm.model.forward(torch.tensor(seq.token_ids), 0, cache)
            self.timings.prompt_seconds = time.perf_counter() - start
            start = time.perf_counter()
            while True:
                delta = seq.next(logits[-1])
                self.timings.eval_seconds = time.perf_counter() - start
                yield delta
                if delta.finish_reason:
                    return
                token = torch.tensor([delta.token_id])
                logits = self.lm.model.forward(token, len(seq.token_ids) - 1, cache)
