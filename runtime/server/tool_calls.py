"""Tool calls: finding them in a model's output, per template family (the grammars that
constrain them are in tool_grammar.py).

The family is read off the chat template source (the markup it renders an assistant's
tool_calls with); a template that does not take `tools` at all gets the generic format: a
system message describing the tools and asking for Hermes-style `<tool_call>{json}</tool_call>`.

    fmt = tool_format(template_source)          # ToolFormat, e.g. HERMES, LLAMA3, MISTRAL
    content, calls = fmt.parse(text, tools)     # calls: [ToolCall(name, arguments JSON text)]

Families (template → output shape):
  hermes     <tool_call>{"name", "arguments"}</tool_call>      Qwen2.5/3, Hermes, Granite 4
             (also <tool_calls>[...]</tool_calls>, <TOOLCALL>[...]</TOOLCALL>, ...)
  xml        <function=NAME><parameter=K>V</parameter></function>        Qwen3-Coder, Qwen3.5
  arg_key    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value> GLM 4.x, Laguna
  invoke     <invoke name="NAME"><parameter name="K">V</parameter>       MiniMax-M2, DeepSeek V3.2+
  llama3     {"name", "parameters"} (after <|python_tag|> or bare)      Llama 3.1-3.3
  mistral    [TOOL_CALLS]NAME[ARGS]{...} or [TOOL_CALLS][{...}]          Mistral, Devstral
  harmony    to=functions.NAME ... <|message|>{...}<|call|>              gpt-oss
  deepseek   <｜tool▁call▁begin｜>[function<｜tool▁sep｜>]NAME ... {...}  DeepSeek R1 / V3
  kimi       <|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{...}  Kimi K2
  pythonic   [NAME(k='v')]                                              LFM2.5
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out = {"index": index, **out}
        return out

    def ollama(self) -> dict:
        return {"function": {"name": self.name, "arguments": json.loads(self.arguments)}}


def _call(name: Any, args: Any) -> ToolCall | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _from_json(obj: Any) -> list[ToolCall]:
    """Calls in a decoded JSON value: an object {name, arguments|parameters} (also
    {"function": {...}}, {"tool_name", "parameters"}, {NAME: {args}}) or a list of them."""
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return []
        if isinstance(item.get("function"), dict):
            item = item["function"]
        name = item.get("name", item.get("tool_name"))
        args = item.get("arguments", item.get("parameters"))
        if name is None and len(item) == 1:  # {"get_weather": {"city": "Paris"}}
            name, args = next(iter(item.items()))
        call = _call(name, args)
        if call is None:
            return []
        calls.append(call)
    return calls


def _json_prefix(text: str) -> tuple[Any, int] | None:
    """The JSON value at the start of `text` (after whitespace) and where it ends."""
    stripped = text.lstrip()
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except ValueError:
        return None
    return value, end + len(text) - len(stripped)


def _value(text: str, name: str, tools: list[dict] | None) -> Any:
    """A parameter written as text: kept as a string where the tool's schema says string,
    else read as JSON when it is JSON."""
    text = text.strip("\n")
    if _param_type(tools, name) == "string":
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _param_type(tools: list[dict] | None, param: str) -> Any:
    for tool in tools or []:
        props = (tool.get("function", tool).get("parameters") or {}).get("properties") or {}
        if param in props:
            return props[param].get("type")
    return None


@dataclass(frozen=True)
class ToolFormat:
    """One family's output shape: `starts` are the texts a call begins with (content is cut
    there), `pattern` finds each call."""

    name: str
    starts: tuple[str, ...]
    pattern: re.Pattern[str] | None = None
    # a call also begins where the output begins with this (after blanks): Qwen2.5-Coder
    # writes Hermes calls bare, {"name": ..., "arguments": ...} without the tags
    lead: str = ""

    def parse(self, text: str, tools: list[dict] | None = None) -> tuple[str, list[ToolCall]]:
        """(the content before the first call, the calls); no calls: (text, [])."""
        at = self.start_of_calls(text)
        if at is None:
            return text, []
        calls = _PARSERS[self.name](self, text[at:], tools)
        if not calls:
            return text, []
        return text[:at].strip(), calls

    def start_of_calls(self, text: str) -> int | None:
        found = [i for s in self.starts if (i := text.find(s)) >= 0]
        head = text.lstrip()
        if (self.name == "llama3" and head.startswith("{")) or (
            self.lead and head.startswith(self.lead)
        ):
            found.append(len(text) - len(head))
        return min(found) if found else None

    def may_lead(self, text: str) -> bool:
        """Whether `text` may still grow into a bare call at the output's start."""
        return bool(self.lead) and self.lead.startswith(text.lstrip())

    def may_start(self, text: str) -> bool:
        """Whether `text` holds, or ends with the beginning of, a call's opening (a stream
        holds such text back until it knows)."""
        if self.start_of_calls(text) is not None:
            return True
        if (self.name == "llama3" and not text.strip()) or self.may_lead(text):
            return True
        return any(text.endswith(s[:k]) for s in self.starts for k in range(1, len(s)))


def _parse_tagged_json(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    if fmt.lead and text.lstrip().startswith(fmt.lead):
        return _parse_bare(text, tools)
    calls = []
    for body in fmt.pattern.findall(text) if fmt.pattern else []:
        got = _json_prefix(body)
        if got is not None:  # a body cut short (the output hit its limit) is left out
            calls += _from_json(got[0])
    return calls


def _parse_bare(text: str, tools: list[dict] | None) -> list[ToolCall]:
    """A bare {"name": ..., "arguments": {...}} that makes up the whole output: a call only
    when it names an offered tool (else it is content, such as a JSON answer with a name)."""
    got = _json_prefix(text)
    if got is None or text[got[1] :].strip() or not isinstance(got[0], dict):
        return []
    obj = got[0]
    names = {t.get("function", t).get("name") for t in tools or []}
    if obj.get("name") not in names or not ({"arguments", "parameters"} & set(obj)):
        return []
    return _from_json(obj)


def _parse_json_run(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    """JSON values one after another (separated by `;`, `,` or whitespace), after a marker."""
    for s in fmt.starts:
        if text.startswith(s):
            text = text[len(s) :]
            break
    calls: list[ToolCall] = []
    while True:
        got = _json_prefix(text)
        if got is None:
            break
        found = _from_json(got[0])
        if not found:
            break
        calls += found
        text = text[got[1] :].lstrip().lstrip(";,")
    return calls


def _parse_xml(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    calls = []
    for name, body in re.findall(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", text, re.S):
        params = re.findall(r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|$)", body, re.S)
        got = None if params else _json_prefix(body)  # functionary: <function=NAME>{json}
        call = _call(name, got[0]) if got else None
        if call is None:
            args = {k: _value(v, k, tools) for k, v in params}
            call = ToolCall(name, json.dumps(args, ensure_ascii=False))
        calls.append(call)
    return calls


def _parse_arg_key(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    calls = []
    for _tag, body in re.findall(r"<tool_call(:\w+)?>(.*?)(?:</tool_call\1?>|$)", text, re.S):
        head = re.split(r"<(?:arg_key|tool_sep)", body, maxsplit=1)[0]
        name = head.strip()
        keys = re.findall(r"<arg_key[^>]*>(.*?)</arg_key[^>]*>", body, re.S)
        vals = re.findall(r"<arg_value[^>]*>(.*?)</arg_value[^>]*>", body, re.S)
        args = {k: _value(v, k, tools) for k, v in zip(keys, vals, strict=False)}
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    return calls


def _parse_invoke(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    calls = []
    invokes = re.findall(
        r'(?:invoke|function) name="([^"]+)">(.*?)(?:</[^>]*(?:invoke|function)>|$)', text, re.S
    )
    for name, body in invokes:
        params = re.findall(
            r'(?:parameter|param) name="([^"]+)"[^>]*>(.*?)</[^>]*(?:parameter|param)>', body, re.S
        )
        args = {k: _value(v, k, tools) for k, v in params}
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    return calls


def _parse_mistral(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    calls: list[ToolCall] = []
    for part in text.split("[TOOL_CALLS]")[1:]:
        if "[ARGS]" in part:  # v11+: NAME[ARGS]{...} (3.2: NAME[CALL_ID]ID[ARGS]{...})
            name, rest = part.split("[ARGS]", 1)
            name = name.split("[CALL_ID]", 1)[0]
            got = _json_prefix(rest)
            call = _call(name.strip(), got[0]) if got else None
            if call is None:
                return []
            calls.append(call)
        else:
            got = _json_prefix(part)
            if got is None:
                return []
            calls += _from_json(got[0])
    return calls


def _parse_harmony(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    calls = []
    found = re.findall(r"to=functions\.([\w.\-]+).*?<\|message\|>(.*?)(?:<\|call\|>|$)", text, re.S)
    for name, body in found:
        got = _json_prefix(body)
        call = _call(name, got[0]) if got else None
        if call is None:
            return []
        calls.append(call)
    return calls


def _parse_deepseek(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    return _parse_name_args(
        r"<｜tool▁call▁begin｜>(?:function<｜tool▁sep｜>)?(.*?)(?:<｜tool▁sep｜>)?\s*(?:```json)?\s*(\{.*?\})\s*(?:```)?\s*<｜tool▁call▁end｜>",
        text,
    )


def _parse_kimi(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    return _parse_name_args(
        r"<\|tool_call_begin\|>\s*(?:functions\.)?([\w.\-]+?)(?::\d+)?\s*<\|tool_call_argument_begin\|>(.*?)(?:<\|tool_call_end\|>|$)",
        text,
    )


def _parse_name_args(pattern: str, text: str) -> list[ToolCall]:
    calls = []
    for name, body in re.findall(pattern, text, re.S):
        call = _call(name.strip(), body.strip())
        if call is None:
            return []
        calls.append(call)
    return calls


def _parse_gemma4(text: str) -> list[ToolCall]:
    """call:NAME{key:<|"|>text<|"|>,n:3}: strings quoted by <|"|>, keys bare."""
    calls = []
    for name, body in re.findall(r"call:([\w.\-]+)(\{.*?\})(?:<tool_call\|>|$)", text, re.S):
        parts = re.split(r'(<\|"\|>.*?<\|"\|>)', body, flags=re.S)
        for k in range(0, len(parts), 2):  # outside strings: quote the bare keys
            parts[k] = re.sub(r"([{,])\s*([A-Za-z_][\w\-]*)\s*:", r'\1"\2":', parts[k])
        for k in range(1, len(parts), 2):
            parts[k] = json.dumps(parts[k][5:-5])
        call = _call(name, "".join(parts))
        if call is None:
            return []
        calls.append(call)
    return calls


def _parse_pythonic(fmt: ToolFormat, text: str, tools) -> list[ToolCall]:
    body = text.split("[", 1)[-1].rsplit("]", 1)[0]
    try:
        tree = ast.parse(f"[{body}]", mode="eval")
    except SyntaxError:
        return []
    calls = []
    for node in getattr(tree.body, "elts", []):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            return []
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
        except ValueError:
            return []
        calls.append(ToolCall(node.func.id, json.dumps(args, ensure_ascii=False)))
    return calls


_PARSERS = {
    "hermes": _parse_tagged_json,
    "solar": lambda f, t, tools: _parse_name_args(
        r"<\|tool_call:name\|>(.*?)<\|tool_call:args\|>(.*?)(?:<\|tool_call:end\|>|$)", t
    ),
    "gemma4": lambda f, t, tools: _parse_gemma4(t),
    "llama3": _parse_json_run,
    "xml": _parse_xml,
    "arg_key": _parse_arg_key,
    "invoke": _parse_invoke,
    "mistral": _parse_mistral,
    "harmony": _parse_harmony,
    "deepseek": _parse_deepseek,
    "kimi": _parse_kimi,
    "pythonic": _parse_pythonic,
}

_TAG_JSON = re.compile(
    r"(?:<tool_call>|<tool_calls>|<TOOLCALL>|<\|tools_prefix\|>|<\|function_call\|>"
    r"|function call<\|role_sep\|>|<\|START_ACTION\|>|<\|tool_call:args\|>)"
    r"(.*?)(?:</tool_calls?>|</TOOLCALL>|<\|tools_suffix\|>|<\|END_ACTION\|>|<\|message_sep\|>"
    r"|<\|tool_call:end\|>|$)",
    re.S,
)
HERMES = ToolFormat(
    "hermes",
    (
        "<tool_call>",
        "<tool_calls>",
        "<TOOLCALL>",
        "<|tools_prefix|>",
        "<|function_call|>",
        "function call<|role_sep|>",
        "<|START_ACTION|>",
    ),
    _TAG_JSON,
    lead='{"name"',
)
XML = ToolFormat("xml", ("<tool_call>", "<seed:tool_call>", "<function="))
ARG_KEY = ToolFormat("arg_key", ("<tool_call>", "<tool_calls:", "<tool_call:"))
INVOKE = ToolFormat(
    "invoke", ("<minimax:tool_call>", "<｜DSML｜", "<atem:function_calls>", "<function name=")
)
SOLAR = ToolFormat("solar", ("<|tool_calls|>", "<|tool_call:begin|>"))
GEMMA4 = ToolFormat("gemma4", ("<|tool_call>",))
LLAMA3 = ToolFormat("llama3", ("<|python_tag|>",))
MISTRAL = ToolFormat("mistral", ("[TOOL_CALLS]",))
HARMONY = ToolFormat("harmony", (" to=functions.", "to=functions."))
DEEPSEEK = ToolFormat("deepseek", ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>"))
KIMI = ToolFormat("kimi", ("<|tool_calls_section_begin|>", "<|tool_call_begin|>"))
PYTHONIC = ToolFormat("pythonic", ("<|tool_call_start|>",))

# (a text the template source holds, its family), most specific first
_MARKERS: list[tuple[str, ToolFormat]] = [
    ("<function=", XML),
    ("<arg_key", ARG_KEY),
    ("invoke name=", INVOKE),
    ("to=functions.", HARMONY),
    ("<|channel|>", HARMONY),
    ("[TOOL_CALLS]", MISTRAL),
    ("tool▁call▁begin", DEEPSEEK),
    ("<|tool_call_begin|>", KIMI),
    ("<|tool_call_start|>", PYTHONIC),
    ("<function name=", INVOKE),
    ("<|tool_call:args|>", SOLAR),
    ("<|tool_call>", GEMMA4),
    ("<|python_tag|>", LLAMA3),
    ("<tool_call>", HERMES),
    ("<tool_calls>", HERMES),
    ("<TOOLCALL>", HERMES),
    ("<|tools_prefix|>", HERMES),
    ("<|function_call|>", HERMES),
    ("START_ACTION", HERMES),
    ('"parameters": ', LLAMA3),
    ("function call", HERMES),
]


def tool_format(template_source: str) -> ToolFormat:
    """The family a template renders tool calls in; Hermes for the generic fallback."""
    for marker, fmt in _MARKERS:
        if marker in template_source:
            return fmt
    return HERMES


def supports_tools(template_source: str) -> bool:
    """Whether the template renders `tools` itself (else the generic system prompt is used)."""
    return "tools" in template_source or ".Tools" in template_source


def generic_system_prompt(tools: list[dict]) -> str:
    """The tool description for a template that has none (Hermes's wording of the format)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to answer. The functions are:\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call a function, reply with a JSON object of its name and arguments inside "
        "<tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
