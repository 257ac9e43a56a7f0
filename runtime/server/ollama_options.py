"""ollama request `options`: sampling options go through SamplingParams.from_options; the
others are accepted when they cannot change the output here, or refused.

    num_ctx                 at most the loaded context (the server's --num-ctx or the
                            Modelfile's); a smaller value limits this request to it
    num_batch, num_thread, num_gpu, main_gpu, use_mmap, use_mlock, low_vram, numa, f16_kv,
    num_keep, penalize_newline, mirostat_eta, mirostat_tau
                            accepted: they only tune speed or memory, or have no effect
                            unless a refused feature is on
    typical_p, tfs_z, mirostat, vocab_only, logits_all, embedding_only
                            accepted at their "off" value only
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from runtime.errors import ContextLengthError, InvalidParameterError
from runtime.sampling_params import OLLAMA_OPTIONS, SamplingParams
from runtime.server.errors import RequestFieldError

NO_EFFECT = {
    "num_batch",
    "num_thread",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "use_mlock",
    "low_vram",
    "numa",
    "f16_kv",
    "num_keep",
    "penalize_newline",
    "mirostat_eta",
    "mirostat_tau",
}
OFF_VALUES: dict[str, Any] = {
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "mirostat": 0,
    "vocab_only": False,
    "logits_all": False,
    "embedding_only": False,
}
KNOWN = set(OLLAMA_OPTIONS) | NO_EFFECT | set(OFF_VALUES) | {"num_ctx"}


@dataclass
class OllamaOptions:
    sampling: dict[str, Any]
    num_ctx: int | None = None

    def params(self, base: SamplingParams) -> SamplingParams:
        try:
            return SamplingParams.from_options(self.sampling, base)
        except RequestFieldError:
            raise
        except InvalidParameterError as err:
            raise RequestFieldError("options", str(err)) from None


def parse_options(options: Any) -> OllamaOptions:
    if options is None:
        return OllamaOptions({})
    if not isinstance(options, dict):
        raise RequestFieldError("options", "options must be an object of option names to values")
    unknown = sorted(set(options) - KNOWN)
    if unknown:
        raise RequestFieldError(
            "options",
            f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(KNOWN))}",
        )
    for name, off in OFF_VALUES.items():
        if name in options and options[name] is not None and options[name] != off:
            raise RequestFieldError(
                "options",
                f"option {name}={options[name]!r} is not "
                f"supported; leave it out or set it to {off!r}",
            )
    num_ctx = options.get("num_ctx")
    if num_ctx is not None and (
        isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx < 1
    ):
        raise RequestFieldError("options", f"num_ctx must be an integer >= 1, got {num_ctx!r}")
    sampling = {k: v for k, v in options.items() if k in OLLAMA_OPTIONS and v is not None}
    return OllamaOptions(sampling, num_ctx)


def fit_context(
    params: SamplingParams, prompt_len: int, num_ctx: int | None, loaded_ctx: int
) -> SamplingParams:
    """Limit the request to a smaller num_ctx; refuse one larger than the loaded context."""
    if num_ctx is None or num_ctx == loaded_ctx:
        return params
    if num_ctx > loaded_ctx:
        raise RequestFieldError(
            "options",
            f"num_ctx {num_ctx} is larger than the {loaded_ctx} "
            "tokens this model was loaded with; start the server with a "
            "larger --num-ctx or set PARAMETER num_ctx in a Modelfile",
        )
    room = num_ctx - prompt_len
    if room < 1:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens but num_ctx is "
            f"{num_ctx}; shorten the prompt or raise num_ctx"
        )
    limit = room if params.max_tokens is None else min(room, params.max_tokens)
    return replace(params, max_tokens=limit)
