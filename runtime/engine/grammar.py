"""Constrained decoding: a per-sequence llguidance matcher that keeps a sample inside a
grammar (a JSON schema, a regex, a choice list, GBNF or Lark).

    grammar = compile_grammar(tokenizer, Grammar("json_schema", schema_text))  # 400 if bad
    matcher = GrammarMatcher(tokenizer, grammar)       # one per sequence (forks get their own)
    sampler.sample(logits, history, matcher)           # accepts / ends_at / mask, as needed
    matcher.advance(token)                             # after a token is chosen
    matcher.done                                       # the grammar can take nothing more

The vocabulary handed to llguidance is tandem's GGUF one: each token's bytes, control tokens
(and user-defined `<...>` tokens) as b"\\xff" + their text, so a grammar can name them
(`<[id]>`) but never spells them from plain text. End-of-generation ids are llguidance's EOS:
the mask allows them only where the grammar may end.

Speed: the mask is not computed for every token. The sampled token is tried first; only when
the grammar rejects it is the mask computed (on the CPU, one bit per token) and the token
drawn again from the masked logits — ollama's approach. Drawing from p, then on rejection from
p restricted to the allowed set A, gives each allowed token p(t) + (1 - p(A)) p(t) / p(A) =
p(t) / p(A): exactly the masked distribution (up to how top_k / top_p truncate first). The
path is runtime.engine.sampler.Sampler.sample with this matcher as its Constraint.

One exception (`ends_at`): a blank token (whitespace only) that the grammar refuses where it
may end is taken as the end, not redrawn. A model ends a JSON value with a newline far more
often than with its end token; masked, that newline's mass went to whatever continues the
value, and a top-level number ran on in digits to max_tokens.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from loaders.tokenizer import CONTROL, UNKNOWN, USER_DEFINED, Tokenizer
from quant.errors import InvalidParameterError
from runtime.engine.trigger import Quiet, Trigger

KINDS = ("json_schema", "regex", "choice", "lark", "gbnf")
_CACHE_SIZE = 64  # compiled grammars kept per tokenizer (pristine matchers, deep-copied)


class GrammarError(InvalidParameterError):
    """A grammar or schema that cannot be enforced; the message says what to change."""


@dataclass(frozen=True)
class Grammar:
    """What a request constrains its output to: `kind` (one of KINDS) and its text (a JSON
    schema as JSON text, a regex, a JSON list of strings, GBNF or Lark source)."""

    kind: str
    text: str
    field: str = "grammar"  # the request field it came from, for error messages

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.text, str) or not self.text:
            raise GrammarError(f"{self.field}: the grammar text must be a non-empty string")

    def llguidance(self) -> str:
        """The llguidance grammar (its JSON form) for this grammar."""
        try:
            if self.kind == "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(
                    self.text, defaults={"whitespace_flexible": False}
                )
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.text)
            if self.kind == "choice":
                options = json.loads(self.text)
                lark = "start: " + " | ".join(json.dumps(o) for o in options)
                return llguidance.LLMatcher.grammar_from_lark(lark)
            if self.kind == "gbnf":
                return llguidance.grammar_from("gbnf", self.text)
            return llguidance.LLMatcher.grammar_from_lark(self.text)
        except (ValueError, TypeError) as err:
            raise GrammarError(f"{self.field} is not a valid {self.kind}: {err}") from None


@dataclass(frozen=True)
class LazyGrammar:
    """A grammar that applies from a trigger on (llama.cpp's lazy grammar): the output is free
    until one of `triggers` appears (or a token of `tokens` is sampled), then `grammar`, which
    begins with the trigger's text, is fed the output from the trigger on and constrains every
    later token. `quiet`: the reasoning span where triggers do not count."""

    grammar: Grammar
    triggers: tuple[Trigger, ...]
    tokens: frozenset[int] = frozenset()
    quiet: Quiet | None = None


def json_schema(schema: Any, field: str) -> Grammar:
    """A Grammar for a JSON schema given as a dict (or True: any JSON value)."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"{field} must be a JSON schema object, got {type(schema).__name__}")
    return Grammar("json_schema", json.dumps(schema), field)


ANY_JSON_OBJECT = {"type": "object"}


# ---- the vocabulary ---------------------------------------------------------------------
class _Vocab:
    """tandem's tokenizer in the shape llguidance.TokenizerWrapper reads."""

    def __init__(self, tok: Tokenizer) -> None:
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else next(iter(tok.eog_ids), 0)
        self.bos_token_id = tok.bos_id
        self.tokens = [_token_bytes(tok, i) for i in range(tok.vocab_size)]
        self.special_token_ids = [
            i for i, t in enumerate(tok.types) if t in (CONTROL, UNKNOWN, USER_DEFINED)
        ]
        self._tok = tok

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special=False, parse_special=False)


def _token_bytes(tok: Tokenizer, i: int) -> bytes:
    kind = tok.types[i]
    text = tok.tokens[i]
    if kind in (CONTROL, UNKNOWN) or (
        kind == USER_DEFINED and text.startswith("<") and text.endswith(">")
    ):
        return b"\xff" + text.encode("utf-8", "surrogatepass")
    return tok.piece(i)


_lock = threading.Lock()


@dataclass
class _PerTokenizer:
    ll: llguidance.LLTokenizer
    blank: frozenset[int]  # tokens of whitespace only
    compiled: OrderedDict[Grammar, llguidance.LLMatcher]  # pristine matchers, LRU


# Dropped with the tokenizer (a model unloaded frees its vocabulary and grammars).
_cache: weakref.WeakKeyDictionary[Tokenizer, _PerTokenizer] = weakref.WeakKeyDictionary()


def _per_tokenizer(tok: Tokenizer) -> _PerTokenizer:
    with _lock:
        hit = _cache.get(tok)
    if hit is not None:
        return hit
    eog = sorted(tok.eog_ids) or [_Vocab(tok).eos_token_id]
    ll = llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_Vocab(tok)), n_vocab=tok.vocab_size, eos_token=eog
    )
    blank = frozenset(i for i in range(tok.vocab_size) if _is_blank(tok, i))
    with _lock:
        return _cache.setdefault(tok, _PerTokenizer(ll, blank, OrderedDict()))


def _is_blank(tok: Tokenizer, i: int) -> bool:
    piece = _token_bytes(tok, i)
    return bool(piece) and not piece.strip()


def ll_tokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tok` (built once per tokenizer: ~1 s on a 50k vocabulary)."""
    return _per_tokenizer(tok).ll


def compile_grammar(tok: Tokenizer, grammar: Grammar) -> llguidance.LLMatcher:
    """A fresh matcher at the grammar's start. GrammarError names what llguidance refuses
    (unsupported schema keywords included: they are never skipped silently)."""
    per = _per_tokenizer(tok)
    with _lock:
        pristine = per.compiled.get(grammar)
        if pristine is not None:
            per.compiled.move_to_end(grammar)
            return pristine.deep_copy()
    matcher = llguidance.LLMatcher(per.ll, grammar.llguidance(), log_level=0)
    if matcher.is_error():
        raise GrammarError(f"{grammar.field} cannot be enforced: {_short(matcher.get_error())}")
    with _lock:
        per.compiled[grammar] = matcher.deep_copy()
        while len(per.compiled) > _CACHE_SIZE:
            per.compiled.popitem(last=False)
    return matcher


def _short(text: str) -> str:
    return text if len(text) <= 600 else text[:600] + "..."


# ---- the per-sequence matcher ------------------------------------------------------------
class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, tok: Tokenizer, grammar: Grammar) -> None:
        self.grammar = grammar
        self._m = compile_grammar(tok, grammar)
        self._blank = _per_tokenizer(tok).blank
        self._vocab = tok.vocab_size
        self.mask_seconds: list[float] = []  # time of each mask computed (the slow path)
        self.check_seconds: list[float] = []  # time of each accept check (every token)
        self.seconds = 0.0  # all time spent here: checks, masks, advances

    def accepts(self, token: int) -> bool:
        """Whether the grammar allows `token` next (an end-of-generation id: where it may end)."""
        t0 = time.perf_counter()
        ok = self._m.validate_tokens([token]) == 1
        spent = time.perf_counter() - t0
        self.check_seconds.append(spent)
        self.seconds += spent
        return ok

    def ends_at(self, token: int) -> bool:
        """Whether `token`, refused by the grammar, ends the output instead: it is blank and
        the grammar may end here (the token is then not output)."""
        return token in self._blank and self._m.is_accepting()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (V,) with every token the grammar forbids at -inf."""
        t0 = time.perf_counter()
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self._vocab].astype(bool)  # (V,)
        spent = time.perf_counter() - t0
        self.mask_seconds.append(spent)
        self.seconds += spent
        if self._m.is_error():
            raise GrammarError(f"the grammar failed: {_short(self._m.get_error())}")
        if not allowed.any():
            raise GrammarError("the grammar allows no token here; it cannot be completed")
        keep = torch.from_numpy(allowed).to(logits.device)
        n = logits.numel()
        if keep.numel() < n:  # the model's vocabulary may be padded beyond the tokenizer's
            keep = torch.cat([keep, keep.new_zeros(n - keep.numel())])
        return logits.masked_fill(~keep[:n], float("-inf"))

    def advance(self, token: int) -> None:
        t0 = time.perf_counter()
        ok = self._m.consume_token(token)
        self.seconds += time.perf_counter() - t0
        if not ok:
            raise GrammarError(f"the grammar refused token {token}: {_short(self._m.get_error())}")

    @property
    def done(self) -> bool:
        """The grammar is complete and can take nothing more (not even optional whitespace)."""
        return self._m.is_stopped()


def check_grammar(tok: Tokenizer, grammar: Grammar | LazyGrammar) -> None:
    """Raise GrammarError now (before a request is queued) if `grammar` cannot be enforced."""
    compile_grammar(tok, grammar.grammar if isinstance(grammar, LazyGrammar) else grammar)
