"""SamplingParams: how one request wants its tokens chosen, validated on construction.

Field names follow vLLM where vLLM has one; `from_options` maps ollama's option names
(repeat_penalty, num_predict, ...) onto them. Every bad value raises InvalidParameterError
naming the field, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from modelfiles.parameters import OPTIONS, SAMPLING
from quant.errors import InvalidParameterError

MAX_N = 128
MAX_LOGPROBS = 20
MAX_SEED = 2**64 - 1

# ollama option name -> SamplingParams field (the sampling rows of the option table).
OLLAMA_OPTIONS: dict[str, str] = {
    o.name: o.field for o in OPTIONS.values() if o.effect == SAMPLING and o.field
}


def _bad(name: str, value: Any, allowed: str) -> InvalidParameterError:
    return InvalidParameterError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _float(name: str, value: Any, lo: float, hi: float, allowed: str) -> float:
    """`value` as a finite float in [lo, hi]; ints are accepted, bools, NaN and inf are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, value, allowed)
    out = float(value)
    if not math.isfinite(out) or not lo <= out <= hi:
        raise _bad(name, value, allowed)
    return out


def _int(name: str, value: Any, lo: int, hi: float, allowed: str) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise _bad(name, value, allowed)
    return int(value)


@dataclass
class SamplingParams:
    """Sampling settings for one request (vLLM's names where vLLM has one)."""

    n: int = 1
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # llama.cpp/ollama repeat_penalty
    repeat_last_n: int = 64  # window for all three penalties; 0 -> off, -1 -> whole history
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top candidates to return with each token (0..20)
    # Constrained decoding: a runtime.engine.grammar.Grammar (kind + text), or None. Checked
    # where the sequence compiles it (a GrammarError names what cannot be enforced).
    grammar: Any = None
    skip_special_tokens: bool = True  # False: control tokens' texts are part of the output

    def __post_init__(self) -> None:
        inf = math.inf
        self.n = _int("n", self.n, 1, MAX_N, f"an integer from 1 to {MAX_N}")
        self.temperature = _float(
            "temperature", self.temperature, 0.0, inf, "a finite number >= 0 (0 means greedy)"
        )
        self.top_p = _float("top_p", self.top_p, 0.0, 1.0, "a number from 0 to 1 (1 means off)")
        self.top_k = _int("top_k", self.top_k, -1, inf, "an integer >= 0 (0 or -1 mean off)")
        self.min_p = _float("min_p", self.min_p, 0.0, 1.0, "a number from 0 to 1 (0 means off)")
        self.repetition_penalty = _float(
            "repetition_penalty",
            self.repetition_penalty,
            0.0,
            inf,
            "a finite number > 0 (1 means off)",
        )
        if self.repetition_penalty == 0.0:
            raise _bad(
                "repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 means off)"
            )
        self.repeat_last_n = _int(
            "repeat_last_n",
            self.repeat_last_n,
            -1,
            inf,
            "an integer >= 0, or -1 for the whole history",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(
                self,
                name,
                _float(name, getattr(self, name), -2.0, 2.0, "a number from -2 to 2 (0 means off)"),
            )
        if self.seed is not None:
            self.seed = _int(
                "seed", self.seed, 0, MAX_SEED, "null (random) or an integer from 0 to 2**64-1"
            )
        self.stop = _stop_list(self.stop)
        self.stop_token_ids = _token_ids(self.stop_token_ids)
        if self.max_tokens is not None:
            self.max_tokens = _int(
                "max_tokens",
                self.max_tokens,
                1,
                inf,
                "null (until the context ends) or an integer >= 1",
            )
        if not isinstance(self.ignore_eos, bool):
            raise _bad("ignore_eos", self.ignore_eos, "true or false")
        if self.logprobs is not None:
            self.logprobs = _int(
                "logprobs",
                self.logprobs,
                0,
                MAX_LOGPROBS,
                f"null or an integer from 0 to {MAX_LOGPROBS}",
            )

    @classmethod
    def from_options(
        cls, options: dict[str, Any], base: SamplingParams | None = None
    ) -> SamplingParams:
        """ollama `options` applied to a copy of `base` (default settings when None)."""
        if not isinstance(options, dict):
            raise _bad("options", options, "an object of ollama option names to values")
        unknown = sorted(k for k in options if k not in OLLAMA_OPTIONS)
        if unknown:
            raise InvalidParameterError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known options: {', '.join(sorted(OLLAMA_OPTIONS))}"
            )
        changes: dict[str, Any] = {}
        for key, value in options.items():
            if key == "num_predict" and _is_int(value) and value < 0:
                value = None  # -1 (and ollama's -2): until the context is full
            elif key == "seed" and _is_int(value) and value < 0:
                value = None  # llama.cpp's -1: a random seed
            changes[OLLAMA_OPTIONS[key]] = value
        return dataclasses.replace(base if base is not None else cls(), **changes)


def _stop_list(stop: Any) -> list[str]:
    allowed = "a string or a list of non-empty strings"
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise _bad("stop", stop, allowed)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise _bad("stop", stop, allowed)
    return list(stop)


def _token_ids(ids: Any) -> list[int]:
    allowed = "a list of integer token ids >= 0"
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
        raise _bad("stop_token_ids", ids, allowed)
    return list(ids)


# The option table's sampling defaults (ollama's): what `tandem run`, the ollama API and the
# OpenAI API start from, before a Modelfile's PARAMETERs and then the request's own settings,
# so a model answers the same whichever way it is asked.
OLLAMA_DEFAULTS = SamplingParams.from_options(
    {name: OPTIONS[name].default for name in OLLAMA_OPTIONS if OPTIONS[name].default is not None}
)
