"""ollama request `options`, read by the option table (modelfiles/parameters.py OPTIONS):

    sampling     applied to this request (SamplingParams.from_options)
    num_ctx      at most the loaded context (the server's --num-ctx or the Modelfile's); a
                 smaller value limits this request to it
    num_gpu, num_thread, num_batch
                 fixed when the model loads: accepted when they restate the loaded value,
                 refused otherwise (set them in a Modelfile, or as server flags)
    unsupported  (mirostat, typical_p, use_mmap, …) accepted only at the value that means
                 what tandem does anyway, refused with the reason otherwise

Anything else (tandem's own settings and Modelfile extensions included) is an unknown option:
ignored, as ollama does, and named in the response header (lenient.py), unless it would change
the answer in a way tandem cannot honour.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from modelfiles.parameters import LOAD, OPTIONS, SAMPLING, UNSUPPORTED
from quant.errors import ContextLengthError, InvalidParameterError
from runtime.sampling_params import SamplingParams
from runtime.server.errors import RequestFieldError
from runtime.server.lenient import lenient
from runtime.server.limits import check_stop

if TYPE_CHECKING:
    from runtime.run_options import RunOptions

KNOWN = {name for name, o in OPTIONS.items() if o.request}


@dataclass
class OllamaOptions:
    sampling: dict[str, Any]
    num_ctx: int | None = None
    load: dict[str, Any] = field(default_factory=dict)  # num_gpu, num_thread, num_batch given

    def params(self, base: SamplingParams, loaded: RunOptions | None = None) -> SamplingParams:
        """`base` with this request's sampling options; with `loaded` (the model's settings),
        load-time options that differ from it are refused."""
        if loaded is not None:
            self.check_loaded(loaded)
        try:
            return SamplingParams.from_options(self.sampling, base)
        except RequestFieldError:
            raise
        except InvalidParameterError as err:
            raise RequestFieldError("options", str(err)) from None

    def check_loaded(self, loaded: RunOptions) -> None:
        values = loaded.load_values()
        for name, value in self.load.items():
            if value != values[name]:
                raise RequestFieldError(
                    "options",
                    f"option {name}={value!r} differs from the {values[name]!r} this model was "
                    f"loaded with, and tandem does not reload a model per request; leave it "
                    f"out, or set PARAMETER {name} in a Modelfile (tandem create)",
                )


def parse_options(options: Any) -> OllamaOptions:
    if options is None:
        return OllamaOptions({})
    if not isinstance(options, dict):
        raise RequestFieldError("options", "options must be an object of option names to values")
    lenient(options, KNOWN, "options.")
    options = {k: v for k, v in options.items() if k in KNOWN}
    check_stop(options.get("stop"), "options.stop")  # before anything reads the list
    given = {k: v for k, v in options.items() if v is not None}
    for name, value in given.items():
        option = OPTIONS[name]
        if option.effect == UNSUPPORTED:
            try:
                option.check(value)
            except ValueError as err:
                raise RequestFieldError("options", str(err)) from None
        elif option.effect == LOAD and (
            isinstance(value, bool) or not isinstance(value, int) or not option.low <= value
        ):
            raise RequestFieldError(
                "options", f"{name} must be an integer >= {int(option.low)}, got {value!r}"
            )
    sampling = {k: v for k, v in given.items() if OPTIONS[k].effect == SAMPLING}
    load = {k: v for k, v in given.items() if OPTIONS[k].effect == LOAD and k != "num_ctx"}
    return OllamaOptions(sampling, given.get("num_ctx"), load)


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
