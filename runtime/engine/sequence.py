"""Sequence: one sample's state while it is generated — its tokens, how many of them have
their KV computed, and the per-token pipeline that turns a step's logits into a Delta
(sample → end/stop checks → streaming detokenization with stop strings held back).

Used by the engine (many at once) and by Generation (one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loaders.detokenizer import StreamDecoder
from loaders.tokenizer import Tokenizer
from quant.errors import ContextLengthError
from runtime.engine.grammar import GrammarMatcher
from runtime.engine.sampler import Sampler
from runtime.engine.stop import StopMatcher
from runtime.sampling_params import SamplingParams


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    eval_tokens: int = 0
    eval_seconds: float = 0.0
    grammar_check_seconds: list[float] = field(default_factory=list)  # per token, constrained
    grammar_mask_seconds: list[float] = field(default_factory=list)  # per mask computed


@dataclass
class Delta:
    token_id: int | None
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort" on a sample's last Delta
    timings: Timings | None = None


def check_prompt(prompt_ids: list[int], n_ctx: int) -> None:
    if not prompt_ids:
        raise ContextLengthError("the prompt is empty; give at least one token of input")
    if len(prompt_ids) >= n_ctx:
        raise ContextLengthError(
            f"the prompt has {len(prompt_ids)} tokens but the context holds {n_ctx}; "
            f"shorten the prompt or raise num_ctx"
        )


class Sequence:
    def __init__(
        self,
        seq_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        n_ctx: int,
    ) -> None:
        check_prompt(prompt_ids, n_ctx)
        self.seq_id, self.params, self.n_ctx = seq_id, params, n_ctx
        self.token_ids = list(prompt_ids)  # prompt + generated; the last may lack its KV
        self.num_prompt = len(prompt_ids)
        self.num_computed = 0  # positions whose KV is written
        self.finished: str | None = None
        self.timings = Timings(prompt_tokens=len(prompt_ids))
        # Scheduling: sequences of one group (a request's n samples) share its turn; the
        # step this one was last scheduled in orders the samples within a group.
        self.group: object = seq_id
        self.last_scheduled = -1
        self._sampler = Sampler(params)
        self._decoder = StreamDecoder(tokenizer, params.skip_special_tokens)
        self._stop = StopMatcher(params.stop)
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids |= tokenizer.eog_ids
        self._grammar = (
            None if params.grammar is None else GrammarMatcher(tokenizer, params.grammar)
        )

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def pending(self) -> int:
        """Tokens whose KV is still to compute before the next sample."""
        return len(self.token_ids) - self.num_computed

    def next(self, logits: torch.Tensor) -> Delta:
        """Sample from the logits (V,) of the last token and return what it adds."""
        res = self._sampler.sample(logits, self.token_ids)
        g = self._grammar
        end = False
        if g is not None and not g.accepts(res.token_id):  # only then is the mask computed
            end = g.ends_at(res.token_id)
            if not end:
                res = self._sampler.sample(g.mask(logits), self.token_ids)
        self.timings.eval_tokens += 1
        if end or res.token_id in self._stop_ids:
            return self._finish(None, res, "stop", "")
        self.token_ids.append(res.token_id)
        text, hit = self._stop.push(self._decoder.push(res.token_id))
        if hit:
            return self._finish(res.token_id, res, "stop", text)
        if g is not None:
            g.advance(res.token_id)
            if g.done:  # the grammar is complete: nothing more may follow
                return self._finish(res.token_id, res, "stop", text)
        limit = self.params.max_tokens
        generated = len(self.token_ids) - self.num_prompt
        if (limit is not None and generated >= limit) or len(self.token_ids) >= self.n_ctx:
            return self._finish(res.token_id, res, "length", text)
        return Delta(res.token_id, text, res.logprob, res.top)

    def abort(self) -> Delta:
        self.finished = "abort"
        return Delta(None, "", finish_reason="abort", timings=self.timings)

    def _finish(self, token: int | None, res, reason: str, text: str) -> Delta:
        """The last Delta; `token` is None when the sampled token (an end token) is not output."""
        self.finished = reason
        if self._grammar is not None:
            self.timings.grammar_check_seconds = self._grammar.check_seconds
            self.timings.grammar_mask_seconds = self._grammar.mask_seconds
        if not self._stop.stopped:  # release held-back text unless a stop string ended it
            text += self._stop.push(self._decoder.flush())[0]
            if not self._stop.stopped:
                text += self._stop.flush()
        return Delta(token, text, res.logprob, res.top, reason, self.timings)
