"""RunOptions: every setting of one model run, resolved once and handed on.

    defaults (modelfiles/parameters.py OPTIONS)
      ▸ `base` (a server's flags: its defaults for every model it loads)
      ▸ the Modelfile's PARAMETERs
      ▸ `flags` (`tandem run`'s flags; an API caller's choices)
      ▸ clamped by the model's trained context (`for_model`, once the GGUF is open)

The planner gets `plan_request()`, the engine `engine_options()`, the model its threads, and a
request starts sampling from `sampling`. Nothing downstream reads a Modelfile or a flag again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelfiles.parameters import LOAD, OPTIONS, SAMPLING, SETTING, default, pin_rule
from quant.errors import InvalidParameterError
from runtime.kv.kv_pool import BLOCK_SIZE, KV_CACHE_TYPES
from runtime.sampling_params import OLLAMA_DEFAULTS, SamplingParams

if TYPE_CHECKING:
    from runtime.placement.planner import PlanRequest


@dataclass(frozen=True)
class RunOptions:
    num_ctx: int = default("num_ctx")
    num_parallel: int = default("num_parallel")
    max_num_seqs: int = default("max_num_seqs")
    kv_cache_type: str = default("kv_cache_type")
    num_gpu: int = default("num_gpu")
    num_cpu_moe: int = default("num_cpu_moe")
    gpu_memory: int | None = default("gpu_memory")
    cpu_pins: tuple[str, ...] = ()  # tensor-name patterns kept on the CPU
    gpu_pins: tuple[str, ...] = ()  # tensor-name patterns put on the GPU
    num_thread: int = default("num_thread")  # 0: torch's configured count
    num_batch: int = default("num_batch")
    sampling: SamplingParams = field(default_factory=lambda: OLLAMA_DEFAULTS)

    @classmethod
    def resolve(
        cls,
        parameters: dict[str, Any] | None = None,
        flags: dict[str, Any] | None = None,
        base: dict[str, Any] | None = None,
    ) -> RunOptions:
        """Defaults ▸ base ▸ parameters (a Modelfile's) ▸ flags; each a dict by option name
        (None values are skipped). InvalidParameterError names what is wrong."""
        merged: dict[str, Any] = {}
        for layer in (base, parameters, flags):
            merged.update({k: v for k, v in (layer or {}).items() if v is not None})
        changes: dict[str, Any] = {}
        sampling: dict[str, Any] = {}
        for name, value in merged.items():
            option = OPTIONS.get(name)
            if option is None:
                raise InvalidParameterError(
                    f"unknown option {name!r}; known options: {', '.join(OPTIONS)}"
                )
            try:
                if option.effect == SAMPLING:
                    sampling[name] = value
                    continue
                if option.kind in ("int", "size") and (
                    isinstance(value, bool) or not isinstance(value, int)
                ):
                    raise ValueError(f"{name} must be an integer, got {value!r}")
                if option.kind == "pin":
                    changes.update(_pins(value))
                    continue
                option.check(value)
            except ValueError as err:
                raise InvalidParameterError(str(err)) from None
            if option.effect in (LOAD, SETTING):
                assert option.field is not None  # every load option and setting names its field
                changes[option.field] = value
            # UNSUPPORTED at its accepted value: what tandem does anyway
        options = cls(**changes, sampling=SamplingParams.from_options(sampling, OLLAMA_DEFAULTS))
        options.validate()
        return options

    def validate(self) -> None:
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise InvalidParameterError(
                f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, "
                f"got {self.kv_cache_type!r}"
            )

    def for_model(self, n_ctx_train: int) -> RunOptions:
        """num_ctx at most the context the model was trained for."""
        if self.num_ctx <= n_ctx_train:
            return self
        return dataclasses.replace(self, num_ctx=n_ctx_train)

    def plan_request(self) -> PlanRequest:
        from runtime.placement.planner import PlanRequest

        return PlanRequest(
            num_ctx=self.num_ctx,
            num_parallel=self.num_parallel,
            num_gpu=self.num_gpu,
            num_cpu_moe=self.num_cpu_moe,
            gpu_memory=self.gpu_memory,
            pins=self.cpu_pins,
            gpu_pins=self.gpu_pins,
            kv_type=self.kv_cache_type,
            num_batch=self.num_batch,
        )

    def engine_options(self, **overrides: Any) -> EngineOptions:
        return EngineOptions(
            **{
                "num_ctx": self.num_ctx,
                "num_parallel": self.num_parallel,
                "max_num_seqs": self.max_num_seqs,
                "kv_cache_type": self.kv_cache_type,
                "max_step_tokens": self.num_batch,
                **overrides,
            }
        )

    def load_values(self) -> dict[str, Any]:
        """The load-time options by their request name, as a request may restate them."""
        return {"num_gpu": self.num_gpu, "num_thread": self.num_thread, "num_batch": self.num_batch}


def _pins(rules: Any) -> dict[str, tuple[str, ...]]:
    if isinstance(rules, str):
        rules = [rules]
    cpu, gpu = [], []
    for rule in rules:
        pattern, device = pin_rule(rule)
        (gpu if device == "gpu" else cpu).append(pattern.pattern)
    return {"cpu_pins": tuple(cpu), "gpu_pins": tuple(gpu)}


@dataclass
class EngineOptions:
    num_ctx: int = default("num_ctx")  # tokens per sequence
    # the KV pool holds num_ctx × num_parallel tokens (unless num_blocks)
    num_parallel: int = default("num_parallel")
    max_num_seqs: int = default("max_num_seqs")  # sequences computed together in one step
    max_waiting: int = 512  # requests waiting beyond this are refused (QueueFullError → 503)
    kv_cache_type: str = default("kv_cache_type")  # or "q8_0"
    num_blocks: int | None = None  # KV pool size in BLOCK_SIZE-token blocks
    max_step_tokens: int = default("num_batch")  # per-step token budget (chunked prefill)

    def __post_init__(self) -> None:
        for name in ("num_ctx", "num_parallel", "max_num_seqs", "max_waiting", "max_step_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise InvalidParameterError(
                f"kv_cache_type must be one of "
                f"{', '.join(KV_CACHE_TYPES)}, got {self.kv_cache_type!r}"
            )
        if self.num_blocks is None:
            self.num_blocks = -(-self.num_ctx * self.num_parallel // BLOCK_SIZE)
        if self.num_blocks * BLOCK_SIZE < self.num_ctx:
            raise InvalidParameterError(
                f"num_blocks {self.num_blocks} holds {self.num_blocks * BLOCK_SIZE} tokens, fewer "
                f"than one num_ctx ({self.num_ctx}); raise num_blocks or lower num_ctx"
            )
