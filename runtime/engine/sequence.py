"""Sequence: one sample's state while it is generated — its tokens, how many of them have
their KV computed, and the per-token pipeline that turns a step's logits into a Delta
(sample → end/stop checks → streaming detokenization with stop strings held back).

Used by the engine (many at once) and by Generation (one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from loaders.detokenizer import StreamDecoder
from loaders.tokenizer import Tokenizer
from quant.errors import ContextLengthError
from runtime.engine.grammar import GrammarMatcher, LazyGrammar
from runtime.engine.sampler import Sampler
from runtime.engine.stop import StopMatcher
from runtime.engine.trigger import TriggerMatcher
from runtime.sampling_params import SamplingParams


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    eval_tokens: int = 0
    eval_seconds: float = 0.0
    grammar_check_seconds: list[float] = field(default_factory=list)  # per token, constrained
    grammar_mask_seconds: list[float] = field(default_factory=list)  # per mask computed
    # A lazy grammar: the generated token in which its trigger appeared (None: not yet or
    # never); before it the grammar cost nothing. `grammar_dropped`: the text from the
    # trigger on was not the grammar's, so the rest went unconstrained.
    grammar_started_at: int | None = None
    grammar_dropped: bool = False
    # With a grammar (lazy or not): the grammar's time on each generated token (checks,
    # masks, advances; at a lazy trigger, feeding it the text from the trigger on).
    grammar_token_seconds: list[float] = field(default_factory=list)


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
        self._tokenizer = tokenizer
        self._lazy: LazyGrammar | None = None
        self._trigger: TriggerMatcher | None = None
        self._grammar: GrammarMatcher | None = None
        self._dropped_seconds = 0.0  # a lazy grammar's time before it was dropped
        if isinstance(params.grammar, LazyGrammar):
            self._lazy = params.grammar
            self._trigger = TriggerMatcher(self._lazy.triggers, self._lazy.tokens, self._lazy.quiet)
        elif params.grammar is not None:
            self._grammar = GrammarMatcher(tokenizer, params.grammar)

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def pending(self) -> int:
        """Tokens whose KV is still to compute before the next sample."""
        return len(self.token_ids) - self.num_computed

    def next(self, logits: torch.Tensor) -> Delta:
        """Sample from the logits (V,) of the last token and return what it adds."""
        if self._lazy is None and self._grammar is None:
            return self._next(logits)
        before = self._grammar_seconds()
        delta = self._next(logits)
        self.timings.grammar_token_seconds.append(self._grammar_seconds() - before)
        return delta

    def _grammar_seconds(self) -> float:
        g = self._grammar
        return self._dropped_seconds + (0.0 if g is None else g.seconds)

    def _next(self, logits: torch.Tensor) -> Delta:
        g = self._grammar
        res = self._sampler.sample(logits, self.token_ids, g)  # g's mask only when refused
        self.timings.eval_tokens += 1
        if res.ends or res.token_id in self._stop_ids:
            return self._finish(None, res, "stop", "")
        self.token_ids.append(res.token_id)
        piece = self._decoder.push(res.token_id)
        text, hit = self._stop.push(piece)
        if hit:
            return self._finish(res.token_id, res, "stop", text)
        if g is not None:
            g.advance(res.token_id)
        elif self._trigger is not None:
            g = self._on_trigger(res.token_id, piece)
        if g is not None and g.done:  # the grammar is complete: nothing more may follow
            return self._finish(res.token_id, res, "stop", text)
        limit = self.params.max_tokens
        generated = len(self.token_ids) - self.num_prompt
        if (limit is not None and generated >= limit) or len(self.token_ids) >= self.n_ctx:
            return self._finish(res.token_id, res, "length", text)
        return Delta(res.token_id, text, res.logprob, res.top)

    def _on_trigger(self, token: int, piece: str) -> GrammarMatcher | None:
        """The lazy grammar's matcher once `token` completes its trigger (fed the output from
        the trigger on, retokenized: the trigger may begin inside a token), else None."""
        assert self._trigger is not None and self._lazy is not None
        rest = self._trigger.push(token, piece)
        if rest is None:
            return None
        self._trigger = None
        self.timings.grammar_started_at = len(self.token_ids) - self.num_prompt - 1
        t0 = time.perf_counter()
        g = GrammarMatcher(self._tokenizer, self._lazy.grammar)
        g.seconds += time.perf_counter() - t0  # a copy of the compiled grammar
        if token in self._lazy.tokens:  # a trigger token: the grammar begins with it
            fed = [token]
        else:
            fed = self._tokenizer.encode(rest, add_special=False, parse_special=True)
        for t in fed:
            if not g.accepts(t):
                self.timings.grammar_dropped = True
                self.timings.grammar_check_seconds = g.check_seconds
                self._dropped_seconds = g.seconds
                return None
            g.advance(t)
        self._grammar = g
        return g

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
