"""A chat request's tools: what was offered (OpenAI `tools`, ollama `tools`), how a call is
required (`tool_choice`: auto, none, required, or a named function; `parallel_tool_calls`),
the history's tool turns, and how all of it reaches the model's chat template.

    req = parse_tools(body["tools"], body.get("tool_choice"), body.get("parallel_tool_calls"))
    messages, extra, fmt = render_inputs(lm, messages, req, template_kwargs)
    grammar = req.grammar(fmt, lm.tokenizer, source, quiet)  # required / named: a Grammar;
                                               # auto: a LazyGrammar (from the trigger on)

A template that takes `tools` gets them as its `tools` variable (HF's convention: a list of
{"type": "function", "function": {...}}) and the history's assistant `tool_calls` with
arguments as objects; a template that does not gets a generic system message (Hermes format)
and tool turns written out as text, so any model can be offered tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from loaders.tokenizer import Tokenizer
from runtime.engine.grammar import Grammar, LazyGrammar
from runtime.engine.trigger import Quiet
from runtime.server.errors import RequestFieldError
from runtime.server.tool_calls import (
    HERMES,
    ToolFormat,
    generic_system_prompt,
    supports_tools,
    tool_format,
)
from runtime.server.tool_grammar import call_grammar, lazy_call_grammar


@dataclass
class ToolRequest:
    tools: list[dict] = field(default_factory=list)  # [{"type": "function", "function": {...}}]
    choice: str = "auto"  # "auto", "none", "required", or "function" (then `name`)
    name: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether tools are offered to the model at all (tool_choice none: not)."""
        return bool(self.tools) and self.choice != "none"

    def grammar(
        self, fmt: ToolFormat, tok: Tokenizer, source: str = "", quiet: Quiet | None = None
    ) -> Grammar | LazyGrammar | None:
        """The grammar forcing a call (tool_choice required or a named function), or for
        auto the lazy one that constrains a call from its opening on (None where the
        family has none)."""
        if not self.active:
            return None
        if self.choice == "auto":
            return lazy_call_grammar(fmt, self.tools, self.parallel, tok, source, quiet)
        tools = self.tools
        if self.choice == "function":
            tools = [t for t in tools if t["function"]["name"] == self.name]
        return call_grammar(fmt, tools, self.parallel and self.choice == "required", tok)


def _tool(i: int, tool: Any) -> dict:
    where = f"tools[{i}]"
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not fn:
        raise RequestFieldError(
            where, f'{where} must be {{"type": "function", "function": {{...}}}}'
        )
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestFieldError(where, f"{where}.function.name must be a non-empty string")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise RequestFieldError(where, f"{where}.function.parameters must be a JSON schema object")
    return {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}


def parse_tools(tools: Any, choice: Any, parallel: Any) -> ToolRequest | None:
    """OpenAI's tools / tool_choice / parallel_tool_calls (ollama's tools have the same shape)."""
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise RequestFieldError("tool_choice", "tool_choice needs tools")
        return None
    if not isinstance(tools, list):
        raise RequestFieldError("tools", "tools must be a list of function tools")
    req = ToolRequest([_tool(i, t) for i, t in enumerate(tools)])
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise RequestFieldError("parallel_tool_calls", "parallel_tool_calls must be a boolean")
        req.parallel = parallel
    if choice in (None, "auto", "none", "required"):
        req.choice = choice or "auto"
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        req.choice, req.name = "function", choice["function"]["name"]
        if req.name not in {t["function"]["name"] for t in req.tools}:
            raise RequestFieldError("tool_choice", f"tool_choice names {req.name!r}, not in tools")
    else:
        raise RequestFieldError(
            "tool_choice",
            'tool_choice must be "auto", "none", "required" or '
            '{"type": "function", "function": {"name": ...}}',
        )
    return req


def tool_messages(where: str, m: dict, out: dict) -> dict:
    """`out` (role and text content of message `m`) with its tool fields: an assistant's
    tool_calls (arguments as objects, as templates expect), a tool result's id and name."""
    calls = m.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise RequestFieldError(where, f"{where}.tool_calls must be a list")
        out["tool_calls"] = [
            _history_call(f"{where}.tool_calls[{i}]", c) for i, c in enumerate(calls)
        ]
    for key in ("tool_call_id", "name", "reasoning_content"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def _history_call(where: str, call: Any) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestFieldError(where, f'{where} must be {{"function": {{"name", "arguments"}}}}')
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RequestFieldError(where, f"{where}.function.arguments is not JSON") from None
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def render_inputs(
    template_source: str | None, messages: list[dict], req: ToolRequest | None
) -> tuple[list[dict], dict[str, Any], ToolFormat]:
    """(messages, template variables, output format) for rendering with tools."""
    source = template_source or ""
    fmt = tool_format(source)
    if req is None or not req.active:
        return messages, {}, fmt
    if supports_tools(source):
        return messages, {"tools": req.tools}, fmt
    return _generic(messages, req.tools), {}, HERMES


def _generic(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Tools described in the system message; tool turns as plain text (a template without
    tool support renders only role and content)."""
    prompt = generic_system_prompt(tools)
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps(c["function"], ensure_ascii=False) + "\n</tool_call>"
                for c in m["tool_calls"]
            )
            m = {"role": "assistant", "content": (m["content"] + "\n" + calls).strip()}
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        else:
            m = {"role": m["role"], "content": m["content"]}
        out.append(m)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out
