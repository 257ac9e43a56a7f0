"""ollama /api/chat and /api/generate bodies parsed into an OllamaPrompt: the model, whether
to stream, and how to turn the request into prompt token ids on the loaded model.

Unknown fields are accepted and ignored (lenient.py); `images`, `suffix` and `template` are
accepted only when empty/off. `format` ("json" or a schema) becomes a Grammar, `tools` a
ToolRequest, `think` the template's enable_thinking (and whether the reasoning is returned
apart). `options` and `keep_alive` are read by the caller (ollama_options, keep_alive).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime.loaded_model import LoadedModel
from runtime.server.errors import RequestFieldError
from runtime.server.lenient import lenient
from runtime.server.structured import ollama_format
from runtime.server.tool_request import ToolRequest, parse_tools, tool_messages

CHAT_FIELDS = {"model", "messages", "tools", "format", "options", "stream", "keep_alive", "think"}
GENERATE_FIELDS = {
    "model",
    "prompt",
    "suffix",
    "images",
    "format",
    "options",
    "system",
    "template",
    "context",
    "stream",
    "raw",
    "keep_alive",
    "think",
}
OFF_ONLY = {
    "images": "images",
    "suffix": "suffix (insertion)",
    "template": "a per-request template (use the model's own)",
}
ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class OllamaPrompt:
    model: str
    stream: bool = True
    messages: list[dict] = field(default_factory=list)  # chat, or generate with the template
    raw_prompt: str | None = None  # generate with raw: true
    context: list[int] = field(default_factory=list)  # generate: ids of an earlier exchange
    grammar: Any = None  # runtime.engine.grammar.Grammar from `format`
    tools: ToolRequest | None = None
    think: bool | None = None  # None: the model's default

    def size(self) -> tuple[int, int]:
        """(characters, token ids) of the request's own prompt, before any template."""
        chars = len(self.raw_prompt or "") + sum(len(m["content"]) for m in self.messages)
        return chars, len(self.context)

    @property
    def load_only(self) -> bool:
        return not self.messages and not self.raw_prompt and not self.context

    def prompt_ids(self, lm: LoadedModel, max_tokens: int | None = None) -> list[int]:
        """The prompt's ids; with max_tokens (the context), tokenizing stops with
        ContextLengthError as soon as the prompt cannot fit."""
        if self.raw_prompt is not None:
            add = not self.context
            ids = lm.tokenizer.encode(self.raw_prompt, add_special=add, max_tokens=max_tokens)
        elif self.messages:
            ids = lm.chat_prompt_ids(self.messages, max_tokens)
            if self.context and ids[:1] == [lm.tokenizer.bos_id]:
                ids = ids[1:]
        else:
            ids = []
        return self._check(lm, self.context) + ids

    @staticmethod
    def _check(lm: LoadedModel, context: list[int]) -> list[int]:
        if any(t >= lm.tokenizer.vocab_size for t in context):
            raise RequestFieldError(
                "context",
                "context holds token ids outside this model's "
                "vocabulary; pass the context this model returned",
            )
        return list(context)


def _common(body: Any, allowed: set[str]) -> OllamaPrompt:
    if not isinstance(body, dict):
        raise RequestFieldError(None, "the request body must be a JSON object")
    lenient(body, allowed)
    for name, what in OFF_ONLY.items():
        if body.get(name) not in (None, "", [], False):
            raise RequestFieldError(name, f"{what} is not supported; leave {name} out")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestFieldError("model", "model must be a non-empty string naming the model")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise RequestFieldError("stream", f"stream must be true or false, got {stream!r}")
    think = body.get("think")
    if think in ("high", "medium", "low"):  # gpt-oss's levels: thinking on
        think = True
    if think is not None and not isinstance(think, bool):
        raise RequestFieldError("think", f"think must be true or false, got {think!r}")
    return OllamaPrompt(model, stream, grammar=ollama_format(body.get("format")), think=think)


def parse_chat(body: Any) -> OllamaPrompt:
    req = _common(body, CHAT_FIELDS)
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise RequestFieldError("messages", "messages must be a list of {role, content}")
    req.messages = [_message(i, m) for i, m in enumerate(messages)]
    req.tools = parse_tools(body.get("tools"), None, None)
    return req


def _message(i: int, m: Any) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise RequestFieldError(
            where, f"{where} must be an object whose role is one of {', '.join(sorted(ROLES))}"
        )
    if m.get("images"):
        raise RequestFieldError(where, f"{where}.images is not supported")
    content = m.get("content") or ""
    if not isinstance(content, str):
        raise RequestFieldError(where, f"{where}.content must be a string")
    out = {"role": m["role"], "content": content}
    if m.get("role") == "tool" and isinstance(m.get("tool_name"), str):
        out["name"] = m["tool_name"]
    if isinstance(m.get("thinking"), str) and m["thinking"]:
        out["reasoning_content"] = m["thinking"]
    return tool_messages(where, m, out)


def parse_generate(body: Any) -> OllamaPrompt:
    req = _common(body, GENERATE_FIELDS)
    prompt, system = body.get("prompt") or "", body.get("system")
    if not isinstance(prompt, str):
        raise RequestFieldError("prompt", "prompt must be a string")
    if system is not None and not isinstance(system, str):
        raise RequestFieldError("system", "system must be a string")
    context = body.get("context") or []
    if not isinstance(context, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in context
    ):
        raise RequestFieldError(
            "context", "context must be the list of token ids a previous /api/generate returned"
        )
    req.context = context
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise RequestFieldError("raw", f"raw must be true or false, got {raw!r}")
    if raw:
        req.raw_prompt = prompt or None
    elif prompt:
        req.messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
    return req
