"""LLM: the offline API, shaped like vLLM's.

    llm = LLM("smollm2")                       # a pullable name or a .gguf path
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=24))
    out[0].outputs[0].text, out[0].outputs[0].token_ids
    llm.chat([{"role": "user", "content": "Hi"}], params)
    llm.tokenize("Hello", add_special=True)

Prompts to generate() are raw text (no chat template); chat() applies the model's template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime.errors import InvalidParameterError
from runtime.generation import Generation, Timings
from runtime.loaded_model import LoadedModel
from runtime.sampling_params import SamplingParams

DEFAULT_NUM_CTX = 4096


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None  # per token: {id: logprob} chosen + top-N
    timings: Timings | None = None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    def __init__(self, model: str | Path, num_ctx: int = DEFAULT_NUM_CTX) -> None:
        self.lm = LoadedModel.load(model)
        self.num_ctx = min(num_ctx, self.lm.config.n_ctx_train)

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.lm.tokenizer.encode(text, add_special=add_special)

    def generate(self, prompts: str | Sequence[str],
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params or SamplingParams()
        return [self._run(p, self.tokenize(p), params) for p in prompts]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        if not isinstance(messages, list) or not messages:
            raise InvalidParameterError("messages must be a non-empty list of {role, content}")
        return self._run(None, self.lm.chat_prompt_ids(messages), params or SamplingParams())

    def _run(self, prompt: str | None, ids: list[int], params: SamplingParams) -> RequestOutput:
        out = RequestOutput(prompt, ids)
        for i in range(params.n):
            # each of n samples draws from its own seed stream: seed, seed+1, …
            seeded = replace(params, seed=params.seed + i) if params.seed is not None else params
            out.outputs.append(self._complete(i, ids, seeded))
        return out

    def _complete(self, index: int, ids: list[int], params: SamplingParams) -> CompletionOutput:
        gen = Generation(self.lm, ids, params, self.num_ctx)
        text, logprobs, finish, timings = [], [], None, None
        for delta in gen:
            text.append(delta.text)
            if delta.token_id is not None and params.logprobs is not None:
                logprobs.append({delta.token_id: delta.logprob, **dict(delta.top)})
            finish, timings = delta.finish_reason, delta.timings
        return CompletionOutput(index, "".join(text), gen.generated, finish,
                                logprobs if params.logprobs is not None else None, timings)
