"""tandem's runtime: engine, model execution, sampler, CLI.

`from runtime import LLM, SamplingParams` is the offline API (vLLM's shape). The names load
lazily, so importing a runtime sub-package does not load the whole engine.
"""

from typing import Any

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
