"""LLM: the offline API, shaped like vLLM's.

    llm = LLM("smollm2")                       # a pullable name or a .gguf path
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=24))
    out[0].outputs[0].text, out[0].outputs[0].token_ids
    llm.chat([{"role": "user", "content": "Hi"}], params)
    llm.tokenize("Hello", add_special=True)
    llm.embed(["a sentence", "another"])      # (B, E) unit vectors, pooled as the GGUF says

Prompts to generate() are raw text (no chat template); chat() applies the model's template.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelfiles.parameters import OPTIONS
from modelfiles.resolver import ModelSpec, resolve
from quant.errors import InvalidParameterError
from runtime.engine.embedder import Embedder
from runtime.engine.llm_engine import LLMEngine
from runtime.engine.sequence import Delta, Timings, check_prompt
from runtime.loaded_model import LoadedModel
from runtime.run_options import RunOptions
from runtime.sampling_params import SamplingParams


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
    """A model and its engine in this thread: generate() batches all prompts together."""

    def __init__(
        self,
        model: str | Path | ModelSpec,
        num_ctx: int | None = None,
        options: RunOptions | None = None,
        **settings,
    ) -> None:
        """`settings` by option name (num_parallel, kv_cache_type, num_thread, num_batch,
        num_gpu, …; modelfiles/parameters.py) override the Modelfile's PARAMETERs, as flags
        do; other names (num_blocks, max_waiting) go to EngineOptions. `options`: settings
        already resolved (then num_ctx and option names in `settings` are not accepted)."""
        spec = model if isinstance(model, ModelSpec) else resolve(model)
        flags = {k: settings.pop(k) for k in list(settings) if k in OPTIONS}
        if options is None:
            options = RunOptions.resolve(spec.parameters, {"num_ctx": num_ctx, **flags})
        elif num_ctx is not None or flags:
            raise InvalidParameterError("give settings either as RunOptions or by name, not both")
        self.lm = LoadedModel.load(spec, options=options)
        self.options = self.lm.options  # clamped to the model's trained context
        self.num_ctx = self.options.num_ctx
        self.engine = LLMEngine(self.lm, self.options.engine_options(**settings))
        self._ids = itertools.count()
        self._embedder: Embedder | None = None

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.lm.tokenizer.encode(text, add_special=add_special)

    def embed(self, inputs: str | Sequence[str] | Sequence[list[int]]) -> torch.Tensor:
        """Texts (tokenized with special tokens) or token lists → (B, E) float32 unit
        vectors: one prefill-only forward, no KV kept (runtime/engine/embedder.py)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        ids = [self.tokenize(x) if isinstance(x, str) else list(x) for x in inputs]
        for prompt in ids:
            check_prompt(prompt, self.num_ctx)
        if self._embedder is None:
            self._embedder = Embedder(self.lm)
        return self._embedder.embed(ids)

    def generate(
        self, prompts: str | Sequence[str], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params or SamplingParams()
        return self._run([(p, self.tokenize(p)) for p in prompts], params)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        if not isinstance(messages, list) or not messages:
            raise InvalidParameterError("messages must be a non-empty list of {role, content}")
        return self._run([(None, self.lm.chat_prompt_ids(messages))], params or SamplingParams())[0]

    def stream(self, ids: list[int], params: SamplingParams) -> Iterator[Delta]:
        """The Deltas of one sample (params.n must be 1) as they are generated."""
        if params.n != 1:
            raise InvalidParameterError("stream() takes n=1; use generate() for n > 1")
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, ids, params)
        try:
            while self.engine.has_unfinished:
                for event in self.engine.step():
                    if event.error is not None:
                        raise event.error
                    assert event.delta is not None  # an Event carries a delta or an error
                    yield event.delta
                    if event.delta.finish_reason:
                        return
        finally:
            self.engine.abort(request_id)  # a no-op when it finished

    def _run(
        self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams
    ) -> list[RequestOutput]:
        outputs, ids = [], []
        for prompt, prompt_ids in prompts:
            logprobs = [] if params.logprobs is not None else None
            out = RequestOutput(
                prompt,
                prompt_ids,
                [CompletionOutput(i, "", [], None, logprobs) for i in range(params.n)],
            )
            outputs.append(out)
            ids.append(f"gen-{next(self._ids)}")
        try:
            for request_id, (_, prompt_ids) in zip(ids, prompts, strict=True):
                self.engine.add_request(request_id, prompt_ids, params)
            by_id = dict(zip(ids, outputs, strict=True))
            while self.engine.has_unfinished:
                for event in self.engine.step():
                    if event.error is not None:
                        raise event.error
                    assert event.delta is not None  # an Event carries a delta or an error
                    _collect(by_id[event.request_id].outputs[event.index], event.delta, params)
        finally:
            for request_id in ids:
                self.engine.abort(request_id)
        return outputs


def _collect(out: CompletionOutput, delta: Delta, params: SamplingParams) -> None:
    out.text += delta.text
    if delta.token_id is not None:
        out.token_ids.append(delta.token_id)
        if params.logprobs is not None:
            assert out.logprobs is not None  # _run gives it a list when params.logprobs is set
            assert delta.logprob is not None  # a sampled token always has one
            out.logprobs.append({delta.token_id: delta.logprob, **dict(delta.top)})
    if delta.finish_reason:
        out.finish_reason, out.timings = delta.finish_reason, delta.timings
