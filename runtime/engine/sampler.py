"""Sampler: picks the next token from a step's logits, in llama.cpp's default chain order.

penalties (repeat, then frequency and presence, over the last repeat_last_n ids of the
history) -> top_k -> top_p -> min_p -> temperature -> draw (argmax when temperature is 0).

Speed on a 262k vocabulary: top_k uses torch.topk; top_p without top_k takes the smallest
top-k slice (growing 8x at a time) that holds top_p of the mass on CPU, and one full sort on
other devices; excluded candidates are masked to -inf rather than sliced out (no device sync);
the draw is an inverse-CDF lookup (cumsum + searchsorted), much faster than torch.multinomial
on CPU. Only the chosen id and the requested top-N logprobs come back to the host.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from quant.errors import InvalidParameterError, NonFiniteLogitsError
from runtime.sampling_params import SamplingParams

_NUCLEUS_START = 1024  # first top-k slice tried for top_p on CPU


@dataclass
class SampleResult:
    """The chosen token and logprobs under the raw model distribution."""

    token_id: int
    # log_softmax of the logits before penalties/temperature, at token_id; None when the
    # params ask for no logprobs (the log_softmax over the vocabulary is then skipped)
    logprob: float | None
    top: list[tuple[int, float]]  # top-N (id, logprob) of the same distribution, best first
    ends: bool = False  # constrained: token_id is a blank the grammar refused where it may end


class Constraint(Protocol):
    """What constrains a sample (runtime.engine.grammar.GrammarMatcher)."""

    def accepts(self, token: int) -> bool: ...
    def ends_at(self, token: int) -> bool: ...
    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...


class Sampler:
    """One request's sampler; owns its random generator so equal seeds give equal draws."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator: torch.Generator | None = None

    def _rng(self, device: torch.device) -> torch.Generator:
        """The generator, made on the logits' device at first use."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def sample(
        self, logits: torch.Tensor, history: Sequence[int], constraint: Constraint | None = None
    ) -> SampleResult:
        """Choose the next token from `logits` (V,), given prompt + generated ids so far;
        within `constraint` when given.

        Constrained, the mask is computed only when needed: a token is drawn from the unmasked
        distribution p and kept if the constraint accepts it; only if not is the mask computed
        and a token drawn again, independently, from p restricted to the allowed set A. That
        is exact rejection sampling: an allowed t comes out with probability
        p(t) + (1 - p(A)) p(t) / p(A) = p(t) / p(A), the masked distribution itself (with
        top_k / top_p / min_p, p is the truncated distribution, as in llama.cpp and ollama);
        greedy, it is the argmax of the masked logits either way. The one exception is
        Constraint.ends_at: a refused blank token where the grammar may end ends the output
        (`ends`). Logprobs are of the raw, unmasked distribution on both paths."""
        res = self._sample(logits, history)
        if constraint is None or constraint.accepts(res.token_id):
            return res
        if constraint.ends_at(res.token_id):
            res.ends = True
            return res
        again = self._sample(constraint.mask(logits), history, draw_only=True)
        return self._result(logits.float(), again.token_id)

    def _sample(
        self, logits: torch.Tensor, history: Sequence[int], draw_only: bool = False
    ) -> SampleResult:
        if logits.dim() != 1 or logits.numel() == 0:
            raise InvalidParameterError(
                f"logits must be a non-empty 1-D tensor (V,), got shape {tuple(logits.shape)}"
            )
        raw = logits.float()
        # max propagates NaN: one reduction finds NaN, +inf, or nothing left to choose
        # (all -inf), any of which would otherwise break the draw or return garbage.
        best = float(_host(raw).max())
        if not math.isfinite(best):
            raise NonFiniteLogitsError(
                f"the model produced non-finite logits (max {best}); this request cannot go on"
            )
        x = self._penalize(raw, history)
        if self.params.temperature == 0.0:
            token = int(_host(x).argmax())  # the first of equal maxima, as torch.argmax
        else:
            vals, ids = self._truncate(x)
            # Shifted so the best is 0: no overflow even for a tiny temperature.
            token = self._draw((vals - vals.max()) / self.params.temperature, ids)
        if draw_only:
            return SampleResult(token, 0.0, [])
        return self._result(raw, token)

    def _penalize(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """Repeat penalty, then frequency and presence penalties, over the history window."""
        p = self.params
        active = (
            p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        )
        window = _window(history, p.repeat_last_n) if active else []
        if not window:
            return logits
        if min(window) < 0 or max(window) >= logits.numel():
            raise InvalidParameterError(
                f"history holds token ids outside the vocabulary 0..{logits.numel() - 1}"
            )
        ids = torch.tensor(window, dtype=torch.long, device=logits.device)
        ids, counts = torch.unique(ids, return_counts=True)
        seen = logits[ids]
        if p.repetition_penalty != 1.0:
            seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:  # (x - 0.0 is x exactly)
            seen = seen - (counts.to(seen.dtype) * p.frequency_penalty + p.presence_penalty)
        out = logits.clone()
        out[ids] = seen
        return out

    def _truncate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """top_k, top_p, min_p: candidate logits with the excluded ones at -inf, and their ids
        (None: the candidates are the whole vocabulary, in id order)."""
        p = self.params
        vals, ids = x, None
        if 0 < p.top_k < x.numel():
            vals, ids = torch.topk(x, p.top_k)  # sorted, best first
        if p.top_p < 1.0:
            if ids is None:  # the whole vocabulary: only its most probable slice matters
                everything = torch.softmax(x, dim=0)
                ids = _nucleus(everything, p.top_p)
                vals, probs = x[ids], everything[ids]
            else:
                probs = torch.softmax(vals, dim=0)
            before = torch.cumsum(probs, dim=0) - probs  # mass of the better candidates
            drop = before >= p.top_p
            drop[0] = False  # the best candidate always stays
            vals = vals.masked_fill(drop, -math.inf)
        if p.min_p > 0.0:
            vals = vals.masked_fill(vals < vals.max() + math.log(p.min_p), -math.inf)
        return vals, ids

    def _draw(self, logits: torch.Tensor, ids: torch.Tensor | None) -> int:
        """One draw from softmax(logits) by inverse CDF; -inf candidates are never chosen."""
        cum = torch.cumsum(torch.softmax(logits, dim=0), dim=0)
        total = cum[-1:]
        u = torch.rand(1, generator=self._rng(cum.device), device=cum.device, dtype=cum.dtype)
        # Strictly below the total, so the pick is a candidate whose probability is > 0.
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        pick = torch.searchsorted(cum, target, right=True)
        return int(pick if ids is None else ids[pick])

    def _result(self, raw: torch.Tensor, token: int) -> SampleResult:
        if self.params.logprobs is None:  # nobody reads it: no pass over the vocabulary
            return SampleResult(token_id=token, logprob=None, top=[])
        logp = torch.log_softmax(raw, dim=0)  # faster than logsumexp on CPU
        n = min(self.params.logprobs or 0, raw.numel())
        top: list[tuple[int, float]] = []
        if n:
            top_vals, top_ids = torch.topk(logp, n)
            top = list(zip(top_ids.tolist(), top_vals.tolist(), strict=True))
        return SampleResult(token_id=token, logprob=float(logp[token]), top=top)


def _host(x: torch.Tensor) -> torch.Tensor | np.ndarray:
    """`x` as numpy on the CPU (its argmax and max over a vocabulary are ~10x faster than
    torch's, with the same answers: the first of equal maxima, NaN propagated), else as is."""
    return x.numpy() if x.device.type == "cpu" else x


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Ids of the most probable tokens, best first, holding at least top_p of the mass (every
    token that top_p can keep). On CPU a growing topk beats a full sort; elsewhere, sort."""
    n = probs.numel()
    k = _NUCLEUS_START if probs.device.type == "cpu" else n
    while k < n // 4:
        vals, ids = torch.topk(probs, k)
        # Margin for float error: top_p keeps a token only if the mass before it is < top_p.
        if float(vals.sum()) >= top_p + 1e-4:
            return ids
        k *= 8
    return torch.sort(probs, descending=True).indices


def _window(history: Sequence[int], last_n: int) -> list[int]:
    """The ids the penalties look at: the last `last_n` (all when -1, none when 0)."""
    if last_n == 0:
        return []
    return list(history) if last_n < 0 else list(history[-last_n:])
