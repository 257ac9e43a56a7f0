"""tandem's runtime: CLI, server, the offline API, engine, model execution, placement, KV.

`from runtime import LLM, SamplingParams` is the offline API (vLLM's shape). The names load
lazily, so importing a runtime sub-package does not load the whole engine.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ loads, for type checkers
    from runtime.llm import LLM
    from runtime.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
