"""OpenAI request bodies (/v1/chat/completions, /v1/completions) parsed and checked.

Every field is either used, accepted because it changes nothing here (`user`, `store`,
`metadata`, ...), accepted at its "off" value only (`tools: []`, `response_format: {"type":
"text"}`, `echo: false`, ...), or refused with a RequestFieldError naming it. Unknown fields are
accepted and ignored (listed in a response header) unless they would change the answer in a
way tandem cannot honour (lenient.py). vLLM's extensions top_k, min_p, repetition_penalty,
ignore_eos and stop_token_ids are accepted.

Output constraints (response_format, structured_outputs, grammar) become one Grammar
(runtime.server.structured); tools, tool_choice and parallel_tool_calls become a ToolRequest
(runtime.server.tool_request); chat_template_kwargs reach the chat template.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quant.errors import InvalidParameterError
from runtime.loaded_model import LoadedModel
from runtime.sampling_params import MAX_LOGPROBS, OLLAMA_DEFAULTS, SamplingParams
from runtime.server.errors import RequestFieldError
from runtime.server.lenient import lenient
from runtime.server.limits import check_n, check_stop, check_stop_token_ids
from runtime.server.structured import grammar_text, one_of, response_format, structured_outputs
from runtime.server.tool_request import ToolRequest, parse_tools, tool_messages

# OpenAI field -> SamplingParams field, for fields passed through unchanged
PASS_THROUGH = {
    "n": "n",
    "stop": "stop",
    "seed": "seed",
    "temperature": "temperature",
    "top_p": "top_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
}
IGNORED = {
    "user",
    "store",
    "metadata",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
}


def _empty(v: Any) -> bool:
    return v in (None, [], {}, "")


def _off_tool_choice(v: Any) -> bool:
    return v in (None, "none", "auto")


# field -> (the values accepted, what to do instead)
OFF_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (_empty, "the legacy functions field is not supported; use tools"),
    "function_call": (_off_tool_choice, "the legacy function_call is not supported; use tools"),
    "logit_bias": (_empty, "logit_bias is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is supported"),
    "audio": (_empty, "audio output is not supported"),
    "prediction": (_empty, "predicted outputs are not supported"),
    "web_search_options": (_empty, "web search is not supported"),
    "reasoning_effort": (_empty, "reasoning_effort is not supported"),
    "verbosity": (_empty, "verbosity is not supported"),
    "echo": (lambda v: v in (None, False), "echo is not supported"),
    "suffix": (_empty, "suffix (insertion) is not supported"),
}
COMMON = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "structured_outputs",
    "grammar",
    *PASS_THROUGH,
    *IGNORED,
}
CHAT_FIELDS = COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "functions",
    "tool_choice",
    "parallel_tool_calls",
    "chat_template_kwargs",
    "function_call",
    "logit_bias",
    "response_format",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "verbosity",
}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of", "logit_bias"}
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class OpenAIRequest:
    model: str
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions
    want_logprobs: bool = False
    changes: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields to set
    tools: ToolRequest | None = None  # chat: tools offered, and how a call is required
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs

    def params(self, lm: LoadedModel, default_max_tokens: int | None) -> SamplingParams:
        """ollama's defaults, the model's Modelfile PARAMETERs on them, this request's
        settings on top (as ollama's OpenAI endpoint does: an unset field keeps the model's
        default, so a Modelfile model answers as through `tandem run`)."""
        base = dataclasses.replace(OLLAMA_DEFAULTS, max_tokens=default_max_tokens)
        base = lm.sampling_defaults(base)
        try:
            return dataclasses.replace(base, **self.changes)
        except RequestFieldError:
            raise
        except InvalidParameterError as err:  # messages start with the field's name
            name = str(err).split(" ", 1)[0]
            raise RequestFieldError(
                name if name in PASS_THROUGH or name == "max_tokens" else None, str(err)
            ) from None


def parse_chat(body: Any) -> OpenAIRequest:
    _check_fields(body, CHAT_FIELDS)
    req = _common(body)
    req.messages = _messages(body.get("messages"))
    req.tools = parse_tools(
        body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    )
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise RequestFieldError("chat_template_kwargs", "chat_template_kwargs must be an object")
    req.template_kwargs = dict(kwargs or {})
    grammar = one_of(
        ("response_format", response_format(body.get("response_format"))),
        ("structured_outputs", structured_outputs(body.get("structured_outputs"))),
        ("grammar", grammar_text(body.get("grammar"))),
    )
    if grammar is not None:
        req.changes["grammar"] = grammar
    limit = _first(body, "max_completion_tokens", "max_tokens")
    if limit is not None:
        req.changes["max_tokens"] = limit
    if body.get("logprobs"):
        top = body.get("top_logprobs")
        req.want_logprobs = True
        req.changes["logprobs"] = 0 if top is None else _logprob_count("top_logprobs", top)
    elif body.get("top_logprobs") is not None:
        raise RequestFieldError("top_logprobs", "top_logprobs needs logprobs: true")
    return req


def parse_completion(body: Any) -> OpenAIRequest:
    _check_fields(body, COMPLETION_FIELDS)
    req = _common(body)
    req.prompt = _prompt(body.get("prompt"))
    grammar = one_of(
        ("structured_outputs", structured_outputs(body.get("structured_outputs"))),
        ("grammar", grammar_text(body.get("grammar"))),
    )
    if grammar is not None:
        req.changes["grammar"] = grammar
    if body.get("max_tokens") is not None:
        req.changes["max_tokens"] = body["max_tokens"]
    if body.get("logprobs") is not None:
        req.want_logprobs = True
        req.changes["logprobs"] = _logprob_count("logprobs", body["logprobs"])
    best_of = body.get("best_of")
    if best_of is not None and best_of != req.changes.get("n", 1):
        raise RequestFieldError(
            "best_of",
            "best_of must equal n (server-side ranking of extra samples is not supported)",
        )
    return req


def _check_fields(body: Any, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise RequestFieldError(None, "the request body must be a JSON object")
    lenient(body, allowed)
    for name, (accepts, why) in OFF_ONLY.items():
        if name in body and not accepts(body[name]):
            raise RequestFieldError(name, f"{name}={body[name]!r} is not supported: {why}")


def _common(body: dict) -> OpenAIRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestFieldError("model", "model must be a non-empty string naming the model")
    req = OpenAIRequest(model, stream=_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise RequestFieldError("stream_options", "stream_options needs stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestFieldError(
                "stream_options", 'stream_options must be {"include_usage": true|false}'
            )
        req.include_usage = _bool(options, "include_usage")
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not 0 <= temperature <= 2:
        raise RequestFieldError(
            "temperature", f"temperature must be from 0 to 2, got {temperature!r}"
        )
    check_n(body.get("n"))
    check_stop(body.get("stop"))
    check_stop_token_ids(body.get("stop_token_ids"))
    req.changes = {
        PASS_THROUGH[k]: v for k, v in body.items() if k in PASS_THROUGH and v is not None
    }
    return req


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestFieldError(name, f"{name} must be true or false, got {value!r}")
    return value


def _first(body: dict, *names: str) -> Any:
    return next((body[n] for n in names if body.get(n) is not None), None)


def _logprob_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise RequestFieldError(
            name, f"{name} must be an integer from 0 to {MAX_LOGPROBS}, got {value!r}"
        )
    return value


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestFieldError(
            "messages", "messages must be a non-empty list of {role, content} objects"
        )
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, m: Any) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise RequestFieldError(
            where, f"{where} must be an object whose role is one of {', '.join(sorted(ROLES))}"
        )
    extra = sorted(
        set(m)
        - {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "reasoning_content"}
    )
    if extra:
        raise RequestFieldError(
            where, f"{where} has unsupported field(s) {', '.join(extra)} (audio is not supported)"
        )
    role = "system" if m["role"] == "developer" else m["role"]
    content = m.get("content")
    if content is None and (m.get("tool_calls") or role == "assistant"):
        content = ""  # an assistant turn that only calls tools
    out = {"role": role, "content": _content(where, content)}
    return tool_messages(where, m, out)


def _content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            return "".join(p["text"] for p in content)
        raise RequestFieldError(
            where,
            f"{where}.content parts must all be "
            '{"type": "text", "text": ...}; images and audio are not supported',
        )
    raise RequestFieldError(where, f"{where}.content must be a string or a list of text parts")


def _prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return prompt
    raise RequestFieldError(
        "prompt",
        "prompt must be a non-empty string or a list of token ids (one prompt per request)",
    )
