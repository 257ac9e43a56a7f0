"""Generation: one sequence's decode loop — prefill, sample, detokenize, stop.

`Generation(lm, prompt_ids, params, n_ctx)` is iterated for Deltas: each carries the new
token, the text now safe to show (never broken UTF-8, never part of a stop string) and,
on the last one, the finish reason ("stop" or "length") and timings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from loaders.detokenizer import StreamDecoder
from runtime.errors import ContextLengthError
from runtime.kv_cache import KVCache
from runtime.loaded_model import LoadedModel
from runtime.sampler import Sampler
from runtime.sampling_params import SamplingParams
from runtime.stop import StopMatcher


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    eval_tokens: int = 0
    eval_seconds: float = 0.0


@dataclass
class Delta:
    token_id: int | None
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    timings: Timings | None = None


class Generation:
    def __init__(self, lm: LoadedModel, prompt_ids: list[int], params: SamplingParams,
                 n_ctx: int) -> None:
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty; give at least one token of input")
        if len(prompt_ids) >= n_ctx:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {n_ctx}; "
                f"shorten the prompt or raise num_ctx")
        self.lm, self.params, self.n_ctx = lm, params, n_ctx
        self.history = list(prompt_ids)
        self.generated: list[int] = []
        self.timings = Timings(prompt_tokens=len(prompt_ids))
        self._sampler = Sampler(params)
        self._decoder = StreamDecoder(lm.tokenizer)
        self._stop = StopMatcher(params.stop)
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids |= lm.tokenizer.eog_ids

    def __iter__(self) -> Iterator[Delta]:
        cache = KVCache(self.lm.config, self.n_ctx)
        with torch.inference_mode():
            start = time.perf_counter()
            logits = self.lm.model.forward(torch.tensor(self.history), 0, cache)
            self.timings.prompt_seconds = time.perf_counter() - start
            start = time.perf_counter()
            while True:
                delta = self._next(logits[-1])
                self.timings.eval_seconds = time.perf_counter() - start
                yield delta
                if delta.finish_reason:
                    return
                token = torch.tensor([delta.token_id])
                logits = self.lm.model.forward(token, len(self.history) - 1, cache)

    def _next(self, logits: torch.Tensor) -> Delta:
        res = self._sampler.sample(logits, self.history)
        self.timings.eval_tokens += 1
        if res.token_id in self._stop_ids:
            return self._finish(None, res, "stop", "")
        self.history.append(res.token_id)
        self.generated.append(res.token_id)
        text, hit = self._stop.push(self._decoder.push(res.token_id))
        if hit:
            return self._finish(res.token_id, res, "stop", text)
        limit = self.params.max_tokens
        if (limit is not None and len(self.generated) >= limit) or len(self.history) >= self.n_ctx:
            return self._finish(res.token_id, res, "length", text)
        return Delta(res.token_id, text, res.logprob, res.top)

    def _finish(self, token: int | None, res, reason: str, text: str) -> Delta:
        """The last Delta; `token` is None when the sampled token (an end token) is not output."""
        if not self._stop.stopped:  # release held-back text unless a stop string ended it
            text += self._stop.push(self._decoder.flush())[0]
            if not self._stop.stopped:
                text += self._stop.flush()
        return Delta(token, text, res.logprob, res.top, reason, self.timings)
