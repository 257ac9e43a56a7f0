"""ChatSetup: a chat request made ready for the engine — the prompt rendered with its tools
and template variables, the sampling parameters with any tool grammar, and how to split the
output (reasoning markers, tool-call format). Shared by the OpenAI and ollama chat routes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from runtime.engine.grammar import check_grammar
from runtime.engine.trigger import Quiet
from runtime.loaded_model import LoadedModel
from runtime.sampling_params import SamplingParams
from runtime.server.chat_output import ChatOutput, Thinking, thinking_for
from runtime.server.errors import RequestFieldError
from runtime.server.tool_calls import ToolFormat
from runtime.server.tool_request import ToolRequest, render_inputs

PROMPT_TAIL_TOKENS = 8  # how much of the prompt's end is read for an opened reasoning block


@dataclass
class ChatSetup:
    ids: list[int]
    params: SamplingParams
    fmt: ToolFormat
    tools: ToolRequest | None
    thinking: Thinking | None

    def output(self) -> ChatOutput | None:
        """A splitter for one sample's text, or None when there is nothing to split."""
        tools = (
            (self.fmt, self.tools.tools) if self.tools is not None and self.tools.active else None
        )
        if tools is None and self.thinking is None:
            return None
        return ChatOutput(self.thinking, tools)


def chat_setup(
    lm: LoadedModel,
    messages: list[dict],
    tools: ToolRequest | None,
    template_kwargs: dict[str, Any],
    params: SamplingParams,
    num_ctx: int,
) -> ChatSetup:
    """Render and check (GrammarError, ContextLengthError); runs off the event loop."""
    source = getattr(lm.template, "source", "") or ""
    messages, extra, fmt = render_inputs(source, messages, tools)
    extra.update(template_kwargs)
    ids = lm.chat_prompt_ids(messages, num_ctx, **extra)
    tail = lm.tokenizer.decode(ids[-PROMPT_TAIL_TOKENS:], skip_special=False)
    thinking = thinking_for(source, tail, bool(template_kwargs.get("enable_thinking", True)))
    if tools is not None and tools.active:
        params = _with_tool_grammar(lm, tools, fmt, source, thinking, params)
    if params.grammar is not None:
        check_grammar(lm.tokenizer, params.grammar)
    return ChatSetup(ids, params, fmt, tools, thinking)


def _with_tool_grammar(
    lm: LoadedModel,
    tools: ToolRequest,
    fmt: ToolFormat,
    source: str,
    thinking: Thinking | None,
    params: SamplingParams,
) -> SamplingParams:
    """`params` with the tools' grammar: forced (required / named) or lazy (auto, unless an
    output format is asked for: then that applies, as in llama.cpp); call markers may be
    control tokens, so they are kept in the text."""
    params = dataclasses.replace(params, skip_special_tokens=False)
    quiet = None if thinking is None else Quiet(thinking.open, thinking.close, thinking.inside)
    grammar = tools.grammar(fmt, lm.tokenizer, source, quiet)
    if grammar is None or (tools.choice == "auto" and params.grammar is not None):
        return params
    if params.grammar is not None:
        raise RequestFieldError(
            "tool_choice", "tool_choice required/named and an output format cannot be combined"
        )
    return dataclasses.replace(params, grammar=grammar)
