"""Structured-output request fields turned into one engine Grammar.

OpenAI   response_format: {"type": "text" | "json_object" | "json_schema",
                           "json_schema": {"name", "schema", "strict"}}
vLLM     structured_outputs: {"json": schema | "regex": str | "choice": [str] | "grammar": str}
         (one key; "json_object": true is also taken)
llama    grammar: GBNF text (llama-server's field; Lark is taken too)
ollama   format: "json" or a JSON schema object

A request that names more than one constraint is refused: which one should win is unclear.
"""

from __future__ import annotations

import json
from typing import Any

from runtime.engine.grammar import ANY_JSON_OBJECT, Grammar, GrammarError, json_schema
from runtime.server.errors import RequestFieldError

STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _bad(field: str, message: str) -> RequestFieldError:
    return RequestFieldError(field, message)


def response_format(value: Any) -> Grammar | None:
    """OpenAI's response_format."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in (
        "text",
        "json_object",
        "json_schema",
    ):
        raise _bad(
            "response_format",
            'response_format must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema(ANY_JSON_OBJECT, "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format", 'response_format.json_schema must be {"name", "schema"}')
    schema = spec.get("schema", {})  # OpenAI: no schema means any JSON
    return _schema(schema, "response_format.json_schema.schema")


def structured_outputs(value: Any) -> Grammar | None:
    """vLLM's structured_outputs (exactly one constraint key)."""
    if value is None:
        return None
    field = "structured_outputs"
    if not isinstance(value, dict):
        raise _bad(field, f"{field} must be an object with one of {', '.join(STRUCTURED_KEYS)}")
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    unknown = sorted(set(value) - set(STRUCTURED_KEYS) - {"disable_any_whitespace"})
    if unknown:
        raise _bad(field, f"{field} has unsupported key(s) {', '.join(unknown)}")
    if len(given) != 1:
        raise _bad(field, f"{field} must set exactly one of {', '.join(STRUCTURED_KEYS)}")
    key = given[0]
    item = value[key]
    where = f"{field}.{key}"
    if key == "json":
        return _schema(json.loads(item) if isinstance(item, str) else item, where)
    if key == "json_object":
        return json_schema(ANY_JSON_OBJECT, where)
    if key == "choice":
        if not isinstance(item, list) or not item or not all(isinstance(c, str) for c in item):
            raise _bad(where, f"{where} must be a non-empty list of strings")
        return Grammar("choice", json.dumps(item), where)
    if not isinstance(item, str) or not item:
        raise _bad(where, f"{where} must be a non-empty string")
    if key == "regex":
        return Grammar("regex", item, where)
    return grammar_text(item, where)


def grammar_text(text: Any, field: str = "grammar") -> Grammar | None:
    """A GBNF grammar (llama.cpp's form); Lark is taken when it is not GBNF (no `::=`)."""
    if text in (None, ""):
        return None
    if not isinstance(text, str):
        raise _bad(field, f"{field} must be a string of GBNF (root ::= ...)")
    return Grammar("gbnf" if "::=" in text else "lark", text, field)


def ollama_format(value: Any) -> Grammar | None:
    """ollama's format: "json" (any JSON value, as ollama: an object) or a JSON schema."""
    if value in (None, ""):
        return None
    if value == "json":
        return json_schema(ANY_JSON_OBJECT, "format")
    if isinstance(value, dict):
        return _schema(value, "format")
    raise _bad("format", 'format must be "json" or a JSON schema object')


def _schema(schema: Any, field: str) -> Grammar:
    try:
        return json_schema(schema, field)
    except GrammarError as err:
        raise _bad(field, str(err)) from None


def one_of(*grammars: tuple[str, Grammar | None]) -> Grammar | None:
    """The one grammar given, or None; more than one is refused naming them."""
    given = [(name, g) for name, g in grammars if g is not None]
    if len(given) > 1:
        names = ", ".join(n for n, _ in given)
        raise _bad(given[1][0], f"give one output constraint, not several ({names})")
    return given[0][1] if given else None
