"""GoTemplate: a Modelfile TEMPLATE (Go text/template form) rendered the way ollama renders it.

The Go source is translated to Jinja once (go_template.py) and rendered by the sandboxed
ChatTemplate. The data follow ollama's template.Execute:

- A template that uses .Messages is rendered once with .System (every system message, joined
  by a blank line) and .Messages (consecutive messages of one role merged with a blank line;
  each has .Role and .Content); it ends with the assistant's opening itself.
- Any other template is the older per-turn kind: it is rendered once per turn with .System,
  .Prompt and .Response, and the last turn's rendering is cut where .Response would start, so
  the prompt ends exactly where the model's answer begins. A template with neither
  .Messages nor .Response gets {{ .Response }} appended first, as ollama does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loaders.chat_template import SAMPLE_CONVERSATION, ChatTemplate
from loaders.template_sandbox import check_text, meter
from modelfiles.go_template import translate

_VERB = re.compile(r"(%.)", re.S)
# Marks where the answer begins in the last turn (a private-use code point pair).
_CUT = "\ue000response\ue001"


def _go_print(value: Any) -> str:
    """fmt.Sprint's form of the values templates print."""
    if not isinstance(value, str):
        check_text(value)
    return _go_format(value)


def _go_format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(_go_format(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_go_format(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def _go_range(value: Any) -> Any:
    """(key, item) pairs; an integer n ranges lazily over 0..n-1 (each step is metered)."""
    if value is None or not value:
        return []
    if isinstance(value, dict):
        meter().step(len(value))
        return sorted(value.items())
    if isinstance(value, int):
        if isinstance(value, bool):  # (True; False returned above)
            raise TypeError("'bool' object is not iterable")  # as enumerate(True) raises
        return ((i, i) for i in range(value))
    return enumerate(value)


def _go_eq(first: Any, *others: Any) -> bool:
    return any(first == other for other in others)


def _go_len(value: Any) -> int:
    return 0 if value is None else len(value)


def _go_index(value: Any, *keys: Any) -> Any:
    for key in keys:
        value = value[key]
    return value


def _go_slice(value: Any, *bounds: int) -> Any:
    """slice x i j: x[i:j]; slice x i: x[i:] (a third bound, the capacity, changes nothing)."""
    return (
        value[bounds[0] : bounds[1]]
        if len(bounds) >= 2
        else value[bounds[0] :]
        if bounds
        else value
    )


def _go_sprint(*values: Any) -> str:
    # Sprint adds a space between operands when neither side is a string
    check_text(*values)
    out = ""
    for i, v in enumerate(values):
        if i and not isinstance(v, str) and not isinstance(values[i - 1], str):
            out += " "
        out += _go_format(v)
    return out


def _go_sprintln(*values: Any) -> str:
    check_text(*values)
    return " ".join(_go_format(v) for v in values) + "\n"


def _go_printf(fmt: str, *args: Any) -> str:
    """Sprintf for the verbs templates use: %s %v %d %q %%."""
    size = check_text(fmt, *args)
    parts = _VERB.split(str(fmt))
    meter().step(len(parts))  # one step per verb: a huge format string is refused
    meter().allow(size + 5 * len(parts), "a printf result")
    out, pending = [], list(args)
    for k, part in enumerate(parts):
        if k % 2 == 0:
            out.append(part)
            continue
        verb = part[1]
        if verb == "%":
            out.append("%")
        elif pending:
            value = pending.pop(0)
            out.append(json.dumps(value, ensure_ascii=False) if verb == "q" else _go_format(value))
        else:
            out.append(f"%!{verb}(MISSING)")
    return "".join(out)


def _go_json(value: Any) -> str:
    check_text(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


HELPERS = {
    "_go_print": _go_print,
    "_go_range": _go_range,
    "_go_eq": _go_eq,
    "_go_len": _go_len,
    "_go_index": _go_index,
    "_go_slice": _go_slice,
    "_go_sprint": _go_sprint,
    "_go_sprintln": _go_sprintln,
    "_go_printf": _go_printf,
    "_go_json": _go_json,
}


def _collate(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """(all system contents joined, messages with runs of one role merged), as ollama."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    merged: list[dict[str, Any]] = []
    for m in messages:
        if merged and merged[-1]["Role"] == m["role"] and m["role"] != "tool":
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    return "\n\n".join(system), merged


class GoTemplate:
    """A Modelfile TEMPLATE; `render(messages)` gives the prompt text, like ChatTemplate's."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        translation = translate(source)
        fields = {f.lower() for f in translation.fields}
        self.uses_messages = "messages" in fields
        jinja = translation.jinja
        if not self.uses_messages and "response" not in fields:
            jinja += '{{ _go_print(_root["Response"]) }}'
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = ChatTemplate(jinja, bos_token=bos_token, eos_token=eos_token, check=False)
        ChatTemplate.check_budget(lambda: self.render([dict(m) for m in SAMPLE_CONVERSATION]))

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt for `messages` (Go templates always end where the answer begins, so
        add_generation_prompt has no effect)."""
        if not self.uses_messages:
            return self._render_turns(messages)
        system, merged = _collate(messages)
        root = {"System": system, "Messages": merged, "Response": "", "Tools": extra.get("tools")}
        return self._execute(messages, root)

    def _execute(self, messages: list[dict[str, Any]], root: dict[str, Any]) -> str:
        return self._template.render(messages, True, _root=root, **HELPERS)

    def _render_turns(self, messages: list[dict[str, Any]]) -> str:
        _, merged = _collate(messages)
        out, turn = [], {"System": "", "Prompt": "", "Response": ""}
        for m in merged:
            role, content = m["Role"], m["Content"]
            if (role == "system" and (turn["Prompt"] or turn["Response"])) or (
                role == "user" and turn["Response"]
            ):
                out.append(self._execute(messages, turn))
                turn = {"System": "", "Prompt": "", "Response": ""}
            key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(role)
            if key:
                turn[key] = content
        last = self._execute(messages, {**turn, "Response": _CUT})
        out.append(last.split(_CUT, 1)[0])
        return "".join(out)
