"""The option vocabulary: every setting a model run takes, in one table (OPTIONS) read by the
Modelfile parser (PARAMETER lines), the servers' request `options`, SamplingParams and
RunOptions (runtime/run_options.py). Each default below is the one tandem uses; nothing else
in the packages restates it.

Values are typed as ollama types them: int values are decimal integers, float values any
decimal or exponent form, bool values Go's strconv.ParseBool spellings (1 t T TRUE true True,
0 f F FALSE false False).

What each option does (`effect`):

    sampling     per request: a SamplingParams field; a Modelfile sets the model's default
    load         fixed when the model loads (RunOptions → planner, engine, threads); a request
                 may restate the loaded value, or ask for a smaller num_ctx
    setting      tandem's own run settings: command-line flags (`tandem run`/`serve`/`plan`),
                 neither a Modelfile PARAMETER nor a request option
    unsupported  ollama's, not implemented: accepted only at the value that means what tandem
                 does anyway (`off`), refused with a message otherwise

`gpu_memory` and `pin` are tandem's extensions to the Modelfile (ollama would reject them):

    gpu_memory SIZE        the most GPU memory this model may take: bytes, or a number with a
                           unit (512MiB, 6GiB, 6GB); layers that do not fit stay on the CPU
    pin PATTERN=DEVICE     put every tensor whose GGUF name matches the regular expression
                           PATTERN (re.search) on DEVICE (cpu, or gpu = cuda = cuda:0), whatever
                           the planner would choose; llama.cpp's --override-tensor form, e.g.
                           `PARAMETER pin "blk\\.(2[4-9])\\.ffn_.*=cpu"`; each line adds one pin
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

SAMPLING, LOAD, SETTING, UNSUPPORTED = "sampling", "load", "setting", "unsupported"
_INF = math.inf


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # "int" | "float" | "bool" | "str" | "size" | "pin"
    default: Any  # tandem's default (None: unset)
    effect: str  # SAMPLING | LOAD | SETTING | UNSUPPORTED
    meaning: str
    field: str | None = None  # the SamplingParams field (sampling) or RunOptions field
    repeated: bool = False  # each Modelfile line adds a value (stop, pin)
    low: float = -_INF  # allowed range (ints, floats, sizes)
    high: float = _INF
    above_low: bool = False  # the range excludes `low` itself
    off: Any = None  # unsupported: the one accepted value (None: always refused)
    ollama: bool = True  # ollama's own name: also a request option
    why: str = ""  # unsupported: what tandem does instead

    @property
    def modelfile(self) -> bool:
        """A Modelfile PARAMETER (settings are flags only)."""
        return self.effect != SETTING

    @property
    def request(self) -> bool:
        """An ollama request option."""
        return self.ollama and self.effect != SETTING

    def range_text(self) -> str:
        if self.high == _INF:
            return f"> {_num(self.low)}" if self.above_low else f">= {_num(self.low)}"
        return f"a number from {_num(self.low)} to {_num(self.high)}"

    def check(self, value: Any) -> None:
        """ValueError saying what is wrong with a typed value (range, or an unsupported value)."""
        if self.effect == UNSUPPORTED:
            if self.off is None or value != self.off:
                keep = "" if self.off is None else f" (only {format_value(self.off)} is accepted)"
                raise ValueError(
                    f"{self.name} {format_value(value)} is not supported by tandem: "
                    f"{self.why}; remove it{keep}"
                )
            return
        if self.kind not in ("int", "float", "size") or isinstance(value, bool):
            return
        low_ok = value > self.low if self.above_low else value >= self.low
        if self.name in _GAPS and value in _GAPS[self.name][0]:
            raise ValueError(f"{self.name} must be {_GAPS[self.name][1]}, got {value}")
        if not (low_ok and value <= self.high):
            if self.kind == "int" and self.high == _INF and not self.above_low:
                raise ValueError(f"{self.name} must be at least {_num(self.low)}, got {value}")
            raise ValueError(f"{self.name} must be {self.range_text()}, got {value}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# values inside an option's range that mean nothing, and how to say what is allowed
_GAPS = {"num_predict": ({0}, "-1 or -2 (until the context ends) or at least 1")}

_S, _L, _T, _U = SAMPLING, LOAD, SETTING, UNSUPPORTED
OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        # sampling: SamplingParams.from_options maps these onto vLLM's field names
        Option("temperature", "float", 0.8, _S, "0 is greedy", "temperature", low=0),
        Option("top_k", "int", 40, _S, "0 is off", "top_k", low=-1),
        Option("top_p", "float", 0.9, _S, "1 is off", "top_p", low=0, high=1),
        Option("min_p", "float", 0.0, _S, "0 is off", "min_p", low=0, high=1),
        Option(
            "repeat_penalty",
            "float",
            1.1,
            _S,
            "1 is off",
            "repetition_penalty",
            above_low=True,
            low=0,
        ),
        Option(
            "repeat_last_n",
            "int",
            64,
            _S,
            "penalty window; 0 off, -1 the whole context",
            "repeat_last_n",
            low=-1,
        ),
        Option(
            "presence_penalty", "float", 0.0, _S, "0 is off", "presence_penalty", low=-2, high=2
        ),
        Option(
            "frequency_penalty", "float", 0.0, _S, "0 is off", "frequency_penalty", low=-2, high=2
        ),
        Option("seed", "int", -1, _S, "-1 is a random seed", "seed", low=-1, high=2**64 - 1),
        Option("stop", "str", None, _S, "a stop string; each line adds one", "stop", repeated=True),
        Option(
            "num_predict",
            "int",
            -1,
            _S,
            "most tokens to generate; -1 (or -2): until the context ends",
            "max_tokens",
            low=-2,
        ),
        # load: RunOptions fields, fixed when the model loads
        Option(
            "num_ctx",
            "int",
            4096,
            _L,
            "context window per sequence in tokens; at most the model's trained context",
            "num_ctx",
            low=1,
        ),
        Option(
            "num_gpu",
            "int",
            -1,
            _L,
            "layers on the GPU; -1 lets the planner choose, 0 none",
            "num_gpu",
            low=-1,
        ),
        Option(
            "num_cpu_moe",
            "int",
            -1,
            _L,
            "mixture-of-experts models: keep the routed experts of the first N layers on the "
            "CPU, the rest on the GPU (llama.cpp's --n-cpu-moe); -1 lets the planner choose",
            "num_cpu_moe",
            low=-1,
            ollama=False,
        ),
        Option(
            "num_thread",
            "int",
            0,
            _L,
            "CPU threads the model's forward uses; 0: torch's configured count",
            "num_thread",
            low=0,
        ),
        Option(
            "num_batch",
            "int",
            512,
            _L,
            "tokens computed per step: the prefill chunk and the engine's step budget",
            "num_batch",
            low=1,
        ),
        Option(
            "gpu_memory",
            "size",
            None,
            _L,
            "the most GPU memory the model may take",
            "gpu_memory",
            low=0,
            ollama=False,
        ),
        Option(
            "pin",
            "pin",
            None,
            _L,
            "PATTERN=DEVICE: tensors matching PATTERN on DEVICE",
            "pins",
            repeated=True,
            ollama=False,
        ),
        # settings: flags of `tandem run`, `serve`, `plan` and `bench`
        Option(
            "num_parallel",
            "int",
            4,
            _T,
            "sequences whose whole context the KV pool holds",
            "num_parallel",
            low=1,
            ollama=False,
        ),
        Option(
            "max_num_seqs",
            "int",
            16,
            _T,
            "sequences computed together in one step (`tandem serve --parallel`)",
            "max_num_seqs",
            low=1,
            ollama=False,
        ),
        Option(
            "kv_cache_type",
            "str",
            "f16",
            _T,
            "KV cache storage: f16, or q8_0",
            "kv_cache_type",
            ollama=False,
        ),
        # ollama's, not implemented
        *(
            Option(name, kind, off, _U, meaning, off=off, why=why)
            for name, kind, off, meaning, why in (
                (
                    "use_mmap",
                    "bool",
                    True,
                    "map the weights instead of reading them",
                    "the GGUF file is always memory-mapped",
                ),
                (
                    "num_keep",
                    "int",
                    4,
                    "prompt tokens kept when the context shifts",
                    "the context never shifts (a generation stops when it is full)",
                ),
                (
                    "typical_p",
                    "float",
                    1.0,
                    "locally typical sampling",
                    "typical sampling is not implemented",
                ),
                (
                    "tfs_z",
                    "float",
                    1.0,
                    "tail-free sampling",
                    "tail-free sampling is not implemented",
                ),
                ("mirostat", "int", 0, "mirostat sampling", "mirostat is not implemented"),
                ("mirostat_tau", "float", 5.0, "mirostat's target", "mirostat is not implemented"),
                ("mirostat_eta", "float", 0.1, "mirostat's rate", "mirostat is not implemented"),
                (
                    "penalize_newline",
                    "bool",
                    True,
                    "apply the penalties to the newline token",
                    "the penalties apply to every token",
                ),
                (
                    "numa",
                    "bool",
                    False,
                    "NUMA-aware placement",
                    "NUMA placement is not implemented",
                ),
                (
                    "main_gpu",
                    "int",
                    0,
                    "the GPU that holds the small tensors",
                    "tandem uses one GPU, cuda:0",
                ),
                (
                    "use_mlock",
                    "bool",
                    False,
                    "lock the weights in RAM",
                    "memory locking is not implemented",
                ),
                (
                    "low_vram",
                    "bool",
                    False,
                    "llama.cpp's low-VRAM mode",
                    "use num_gpu or gpu_memory to limit VRAM",
                ),
                (
                    "f16_kv",
                    "bool",
                    True,
                    "f16 KV cache",
                    "set the KV cache type with --kv-cache-type",
                ),
                (
                    "logits_all",
                    "bool",
                    False,
                    "return every position's logits",
                    "only the last position's logits are computed",
                ),
                ("vocab_only", "bool", False, "load the vocabulary only", "a model loads whole"),
                (
                    "embedding_only",
                    "bool",
                    False,
                    "embeddings only",
                    "embeddings are not implemented",
                ),
                (
                    "num_gqa",
                    "int",
                    None,
                    "attention groups (old GGML files)",
                    "the GGUF's head counts decide it",
                ),
            )
        ),
    )
}

# What a Modelfile may set (PARAMETER lines), in table order.
PARAMETERS: dict[str, Option] = {n: o for n, o in OPTIONS.items() if o.modelfile}


def default(name: str) -> Any:
    """tandem's default for an option: the one place each default is written."""
    return OPTIONS[name].default


def known(name: str) -> bool:
    return name in PARAMETERS


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


def parse_value(name: str, text: str) -> Any:
    """The typed value of `PARAMETER name text`; ValueError saying what is wrong (a bad type,
    a value out of range, an unsupported option at a value other than its `off`)."""
    option = OPTIONS[name]
    value = _PARSERS[option.kind](text)
    option.check(value)
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
            f"expected PATTERN=DEVICE with DEVICE one of cpu, gpu, cuda, cuda:0, got {text!r}"
        )
    pin_rule(f"{pattern}={device}")  # a regular expression, on a device tandem has
    return f"{pattern}={device}"


def _str(text: str) -> str:
    if not text:
        raise ValueError("expected a non-empty string")
    return text


_PARSERS = {"int": _int, "float": _float, "bool": _bool, "size": _size, "pin": _pin, "str": _str}


def format_value(value: Any) -> str:
    """A typed value back in Modelfile form (the inverse of parse_value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def pin_rule(text: str) -> tuple[re.Pattern[str], str]:
    """A stored pin ("PATTERN=device") as (compiled pattern, "cpu" | "gpu"); ValueError for a
    malformed pin or a GPU other than cuda:0 (tandem places on one GPU)."""
    pattern, _, device = text.rpartition("=")
    if not pattern:
        raise ValueError(f"pin {text!r} is not PATTERN=DEVICE")
    device = device.strip().lower()
    if device in ("gpu", "cuda", "cuda:0"):
        device = "gpu"
    elif device != "cpu":
        raise ValueError(
            f"pin {text!r}: tandem places tensors on the CPU or on one GPU (cuda:0); "
            "use =cpu or =gpu"
        )
    try:
        return re.compile(pattern), device
    except re.error as err:
        raise ValueError(f"pin pattern {pattern!r} is not a regular expression: {err}") from None
