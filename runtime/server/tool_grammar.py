"""The grammars of tool calls, per template family: the tools' names and parameter schemas
in the family's call markup.

    call_grammar(fmt, tools, parallel, tok)                # tool_choice required / named:
                                                           # applied from the first token
    lazy_call_grammar(fmt, tools, parallel, tok, source)   # tool_choice auto: from the
                                                           # family's trigger on, or None

Lazy (llama.cpp's `grammar_lazy`): the output is free until the family's call opening (the
trigger) appears; the grammar begins with that opening, is fed the output from it on, and
constrains the rest: one call, or with `parallel` one or more, then the end. Triggers:
  hermes   <tool_call>, or {"name" as the output's first text (Qwen2.5-Coder's bare calls);
           for templates that write <tool_call>, and the generic prompt
  llama3   <|python_tag|>, or {"name" as the output's first text
  mistral  [TOOL_CALLS]   (NAME[ARGS]{...} where the template writes [ARGS], else [{...}])
  harmony  to=functions.  (gpt-oss: NAME, the header's rest, <|message|>, the arguments)
Other families get no lazy grammar (their calls are parsed after the fact, unconstrained).
"""

from __future__ import annotations

import json

from loaders.tokenizer import CONTROL, USER_DEFINED, Tokenizer
from runtime.engine.grammar import Grammar, LazyGrammar
from runtime.engine.trigger import Quiet, Trigger
from runtime.server.tool_calls import ToolFormat, supports_tools

_TOJSON = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _call_schema(tool: dict, args_key: str) -> dict:
    fn = tool.get("function", tool)
    params = fn.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, args_key: params},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def _calls_schema(tools: list[dict], args_key: str) -> dict:
    return {"anyOf": [_call_schema(t, args_key) for t in tools]}


def _special(text: str, tok: Tokenizer) -> int | None:
    """The id of the one special token that spells `text`, if the vocabulary has one."""
    ids = tok.encode(text, add_special=False, parse_special=True)
    if len(ids) == 1 and tok.types[ids[0]] in (CONTROL, USER_DEFINED):
        return ids[0]
    return None


def _literal(text: str, tok: Tokenizer) -> str:
    """`text` in Lark: a special token of the vocabulary as <[id]>, else a quoted string."""
    special = _special(text, tok)
    return json.dumps(text) if special is None else f"<[{special}]>"


def _json(schema: dict) -> str:
    """`schema` as a Lark %json rule, spaced as templates' tojson writes it (a call in any
    other spacing is off the model's training and may wander: blank lines before a comma)."""
    return "%json " + json.dumps({**schema, "x-guidance": _TOJSON})


def _hermes(tok: Tokenizer, parallel: bool, newline: str) -> str:
    """<tool_call>{newline}{json}{newline}</tool_call>, calls separated by a newline that may
    also end the output (else it would force another call)."""
    one = f"{_literal('<tool_call>', tok)} {newline} call {newline} {_literal('</tool_call>', tok)}"
    many = 'one ("\\n" one)* "\\n"?' if parallel else "one"
    return f"start: {many}\none: {one}\n"


def _mistral_array(tools: list[dict], parallel: bool, tok: Tokenizer) -> str:
    """[TOOL_CALLS][{"name", "arguments"[, "id"]}, ...] (Mistral Nemo writes a 9-letter id)."""
    items = _calls_schema(tools, "arguments")
    for one in items["anyOf"]:
        one["properties"]["id"] = {"type": "string", "pattern": "^[A-Za-z0-9]{9}$"}
    calls: dict = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    return f"start: {_literal('[TOOL_CALLS]', tok)} calls\ncalls: {_json(calls)}\n"


def call_grammar(fmt: ToolFormat, tools: list[dict], parallel: bool, tok: Tokenizer) -> Grammar:
    """A grammar whose every output is one (or, with `parallel`, one or more) call(s) of
    `tools` in the family's format. Applied from the first token (not lazily at a trigger).
    Families without a JSON-bodied format fall back to the Hermes form."""
    key = "parameters" if fmt.name == "llama3" else "arguments"
    if fmt.name == "mistral":
        return Grammar("lark", _mistral_array(tools, parallel, tok), "tool_choice")
    if fmt.name == "llama3":
        many = 'one (";" one)*' if parallel else "one"
        head = f"start: {many}\none: call\n"
    else:
        head = _hermes(tok, parallel, '"\\n"')
    return Grammar("lark", f"{head}call: {_json(_calls_schema(tools, key))}\n", "tool_choice")


# ---- lazy: from the trigger on (tool_choice auto) ----------------------------------------
def _lazy_hermes(tools: list[dict], parallel: bool, tok: Tokenizer) -> str:
    """Tagged calls (the trigger's token may carry on past it: a newline, or none, before
    the JSON), or one bare call where the output began with {"name"."""
    tagged = _hermes(tok, parallel, '"\\n"?').replace("start:", "tagged:", 1)
    schema = _json(_calls_schema(tools, "arguments"))
    return f"start: tagged | call\n{tagged}call: {schema}\n"


def _lazy_llama3(tools: list[dict], parallel: bool, tok: Tokenizer) -> str:
    many = 'one (";" " "? one)*' if parallel else "one"
    tag = _literal("<|python_tag|>", tok)
    schema = _json(_calls_schema(tools, "parameters"))
    return f"start: {tag}? {many}\none: call\ncall: {schema}\n"


def _mistral_args(tools: list[dict], parallel: bool, tok: Tokenizer) -> str:
    """[TOOL_CALLS]NAME[ARGS]{...} per call (Mistral Small 3.2 also writes [CALL_ID]ID)."""
    lit = {m: _literal(m, tok) for m in ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")}
    rules = []
    for i, t in enumerate(tools):
        fn = t.get("function", t)
        params = fn.get("parameters") or {"type": "object"}
        rules.append(
            f"t{i}: {json.dumps(fn['name'])} ({lit['[CALL_ID]']} /[A-Za-z0-9]{{9}}/)? "
            f"{lit['[ARGS]']} {_json(params)}"
        )
    alts = " | ".join(f"t{i}" for i in range(len(tools)))
    many = "one+" if parallel else "one"
    return f"start: {many}\none: {lit['[TOOL_CALLS]']} ({alts})\n" + "\n".join(rules) + "\n"


def _lazy_harmony(tools: list[dict], parallel: bool, tok: Tokenizer) -> str:
    """to=functions.NAME, the rest of the header (`<|channel|>commentary`, `<|constrain|>`,
    `json`, each where gpt-oss may write it), <|message|>, the arguments; <|call|> ends
    generation (an end token). One call per message: `parallel` has nothing to add."""
    lit = {m: _literal(m, tok) for m in ("<|channel|>", "<|constrain|>", "<|message|>")}
    header = f'({lit["<|channel|>"]} "commentary")? " "? ({lit["<|constrain|>"]} " "?)? "json"?'
    rules = []
    for i, t in enumerate(tools):
        fn = t.get("function", t)
        params = fn.get("parameters") or {"type": "object"}
        rules.append(f"t{i}: {json.dumps(fn['name'])} header {lit['<|message|>']} {_json(params)}")
    alts = " | ".join(f"t{i}" for i in range(len(tools)))
    return f'start: "to=functions." ({alts})\nheader: {header}\n' + "\n".join(rules) + "\n"


def _lazy_form(fmt: ToolFormat, source: str) -> tuple[tuple[Trigger, ...], str] | None:
    """The family's triggers and which grammar follows them; None: no lazy grammar."""
    if fmt.name == "hermes" and ("<tool_call>" in source or not supports_tools(source)):
        return (Trigger("<tool_call>"), Trigger(fmt.lead, at_start=True)), "hermes"
    if fmt.name == "llama3":
        return (Trigger("<|python_tag|>"), Trigger('{"name"', at_start=True)), "llama3"
    if fmt.name == "mistral":
        return (Trigger("[TOOL_CALLS]"),), "mistral_args" if "[ARGS]" in source else "mistral"
    if fmt.name == "harmony":
        return (Trigger("to=functions."),), "harmony"
    return None


def lazy_call_grammar(
    fmt: ToolFormat,
    tools: list[dict],
    parallel: bool,
    tok: Tokenizer,
    source: str,
    quiet: Quiet | None = None,
) -> LazyGrammar | None:
    """The grammar of the rest of a call from the family's trigger on (tool_choice auto),
    or None where the family has none here."""
    form = _lazy_form(fmt, source)
    if form is None:
        return None
    triggers, kind = form
    build = {
        "hermes": _lazy_hermes,
        "llama3": _lazy_llama3,
        "mistral": _mistral_array,
        "mistral_args": _mistral_args,
        "harmony": _lazy_harmony,
    }[kind]
    lark = build(tools, parallel, tok)
    tokens = frozenset(i for t in triggers if (i := _special(t.word, tok)) is not None)
    return LazyGrammar(Grammar("lark", lark, "tools"), triggers, tokens, quiet)
