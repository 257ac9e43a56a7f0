"""Modelfile PARAMETERs: ollama's names, value types and defaults, and tandem's placement keys.

ollama's parameters (its docs/modelfile.md table and api.DefaultOptions), typed as ollama types
them: int values are decimal integers, float values any decimal or exponent form, bool values
Go's strconv.ParseBool spellings (1 t T TRUE true True, 0 f F FALSE false False).

    name               type   default  meaning
    num_ctx            int    2048     context window in tokens (tandem's CLI uses 4096 when unset)
    num_predict        int    -1       most tokens to generate; -1 (or -2): until the context ends
    num_keep           int    4        tokens kept from the prompt start when the context shifts
    temperature        float  0.8      0 is greedy
    top_k              int    40       0 is off
    top_p              float  0.9      1 is off
    min_p              float  0.0      0 is off
    repeat_penalty     float  1.1      1 is off
    repeat_last_n      int    64       penalty window; 0 off, -1 the whole context
    presence_penalty   float  0.0
    frequency_penalty  float  0.0
    seed               int    -1       -1 is a random seed
    stop               str    (none)   a stop string; each `PARAMETER stop` line adds one
    num_gpu            int    -1       layers to place on the GPU; -1 lets tandem plan
    num_thread         int    0        CPU threads; 0 lets tandem decide
    num_batch          int    512      prompt tokens processed per step
    use_mmap           bool   (unset)  map the weights instead of reading them

tandem's extensions (ollama would reject these as unknown parameters):

    gpu_memory SIZE        the most GPU memory this model may take: bytes, or a number with a
                           unit (512MiB, 6GiB, 6GB); layers that do not fit stay on the CPU
    pin PATTERN=DEVICE     put every tensor whose GGUF name matches the regular expression
                           PATTERN (re.search) on DEVICE (cpu, gpu, cuda or cuda:N), whatever
                           the planner would choose; llama.cpp's --override-tensor form, e.g.
                           `PARAMETER pin "blk\\.(2[4-9])\\.ffn_.*=cpu"`; each line adds one pin

Parameters ollama accepts but tandem does not use (IGNORED) are type-checked and dropped with
a warning, so ollama's Modelfiles still create.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from runtime.errors import InvalidParameterError
from runtime.sampling_params import OLLAMA_OPTIONS, SamplingParams

_BOOL = {
    "1": True,
    "t": True,
    "T": True,
    "TRUE": True,
    "true": True,
    "True": True,
    "0": False,
    "f": False,
    "F": False,
    "FALSE": False,
    "false": False,
    "False": False,
}
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_DEVICE = re.compile(r"cpu|gpu|cuda(?::[0-9]+)?")


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # "int" | "float" | "bool" | "str" | "size" | "pin"
    default: Any  # ollama's default (None: unset); what a model gets when the Modelfile is silent
    repeated: bool = False  # each line adds a value (stop, pin) instead of replacing it
    low: float = -math.inf  # smallest allowed value (ints and sizes)


PARAMETERS: dict[str, Parameter] = {
    p.name: p
    for p in (
        Parameter("num_ctx", "int", 2048, low=1),
        Parameter("num_predict", "int", -1, low=-2),
        Parameter("num_keep", "int", 4, low=-1),
        Parameter("temperature", "float", 0.8),
        Parameter("top_k", "int", 40),
        Parameter("top_p", "float", 0.9),
        Parameter("min_p", "float", 0.0),
        Parameter("repeat_penalty", "float", 1.1),
        Parameter("repeat_last_n", "int", 64),
        Parameter("presence_penalty", "float", 0.0),
        Parameter("frequency_penalty", "float", 0.0),
        Parameter("seed", "int", -1),
        Parameter("stop", "str", None, repeated=True),
        Parameter("num_gpu", "int", -1, low=-1),
        Parameter("num_thread", "int", 0, low=0),
        Parameter("num_batch", "int", 512, low=1),
        Parameter("use_mmap", "bool", None),
        Parameter("gpu_memory", "size", None, low=0),
        Parameter("pin", "pin", None, repeated=True),
    )
}

# ollama's own parameters that tandem has no use for: accepted, type-checked, dropped.
IGNORED: dict[str, str] = {
    "typical_p": "float",
    "tfs_z": "float",
    "mirostat": "int",
    "mirostat_tau": "float",
    "mirostat_eta": "float",
    "penalize_newline": "bool",
    "numa": "bool",
    "main_gpu": "int",
    "use_mlock": "bool",
    "low_vram": "bool",
    "f16_kv": "bool",
    "logits_all": "bool",
    "vocab_only": "bool",
    "num_gqa": "int",
}


def known(name: str) -> bool:
    return name in PARAMETERS or name in IGNORED


def parse_value(name: str, text: str) -> Any:
    """The typed value of `PARAMETER name text`; ValueError saying what is wrong."""
    kind = PARAMETERS[name].kind if name in PARAMETERS else IGNORED[name]
    value = _PARSERS[kind](text)
    spec = PARAMETERS.get(name)
    if spec is not None and kind in ("int", "size") and value < spec.low:
        raise ValueError(f"{name} must be at least {int(spec.low)}, got {text!r}")
    return value


def _int(text: str) -> int:
    if not _INT.fullmatch(text):
        raise ValueError(f"expected an integer, got {text!r}")
    return int(text)


def _float(text: str) -> float:
    if not _FLOAT.fullmatch(text):
        raise ValueError(f"expected a number, got {text!r}")
    return float(text)


def _bool(text: str) -> bool:
    if text not in _BOOL:
        raise ValueError(f"expected true or false, got {text!r}")
    return _BOOL[text]


def _size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"expected a size such as 6GiB, 512MiB or a number of bytes, got {text!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def _pin(text: str) -> str:
    pattern, sep, device = text.rpartition("=")
    device = device.strip().lower()
    if not sep or not pattern or not _DEVICE.fullmatch(device):
        raise ValueError(
            f"expected PATTERN=DEVICE with DEVICE one of cpu, gpu, cuda, cuda:N, got {text!r}"
        )
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"pin pattern {pattern!r} is not a regular expression: {err}") from None
    return f"{pattern}={device}"


def _str(text: str) -> str:
    if not text:
        raise ValueError("expected a non-empty string")
    return text


_PARSERS = {"int": _int, "float": _float, "bool": _bool, "size": _size, "pin": _pin, "str": _str}


def check_sampling(parameters: dict[str, Any]) -> None:
    """Range-check the sampling parameters as a request's options would be; raises
    InvalidParameterError naming the parameter."""
    for name, value in parameters.items():
        if name in OLLAMA_OPTIONS:
            SamplingParams.from_options({name: value})


def format_value(value: Any) -> str:
    """A typed value back in Modelfile form (the inverse of parse_value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def pin_rule(text: str) -> tuple[re.Pattern[str], str]:
    """A stored pin ("PATTERN=device") as (compiled pattern, device) for the placement planner."""
    pattern, _, device = text.rpartition("=")
    if not pattern:
        raise InvalidParameterError(f"pin {text!r} is not PATTERN=DEVICE")
    return re.compile(pattern), device
