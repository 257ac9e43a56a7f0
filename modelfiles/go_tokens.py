"""Tokens of a Go text/template action ({{ ... }}) and their literal values: the lexical
half of go_template.py. Strings take Go's escapes (backslash n, t, xHH, uHHHH, UHHHHHHHH,
octal ooo, ...); `raw strings` take none; numbers are Go's decimal, hex and float forms.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

from quant.errors import TemplateError

TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<number>[+-]?(?:0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?))
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<dot>\.)
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<declare>:=)
  | (?P<punct>[()|,=])
""",
    re.VERBOSE,
)
_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
}


@dataclass
class Token:
    kind: str
    text: str


def number(text: str) -> str:
    """The Jinja literal of a Go number; TemplateError when Go could not hold it either
    (integers beyond 64 bits, floats beyond float64)."""
    if len(text) > 400:
        raise TemplateError(f"number {text[:20]}... is out of range")
    try:
        value = int(text, 0)
    except ValueError:
        pass
    else:
        if not -(1 << 63) <= value < 1 << 64:
            raise TemplateError(f"number {text[:40]} is out of range (Go integers have 64 bits)")
        return str(value)
    try:
        result = float(text)
    except ValueError:
        raise TemplateError(f"bad number syntax: {text[:40]!r}") from None
    if not math.isfinite(result):
        raise TemplateError(f"number {text[:40]} is out of range (float64)")
    return repr(result)


def _hex_escape(body: str, i: int, esc: str) -> tuple[str, int]:
    width = {"x": 2, "u": 4, "U": 8}[esc]
    digits = body[i + 2 : i + 2 + width]
    if len(digits) != width or any(c not in string.hexdigits for c in digits):
        raise TemplateError(
            f"\\{esc} needs {width} hex digits in a string: {body[i : i + 2 + width]!r}"
        )
    code = int(digits, 16)
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        raise TemplateError(f"escape \\{esc}{digits} is not a valid Unicode code point")
    return chr(code), i + 2 + width


def unquote(text: str) -> str:
    """The value of a Go string literal; TemplateError on an escape Go would refuse."""
    if text.startswith("`"):
        return text[1:-1]
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        esc = body[i + 1]
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i += 2
        elif esc in "xuU":
            char, i = _hex_escape(body, i, esc)
            out.append(char)
        elif esc in "01234567":  # octal \ooo: exactly three digits, at most \377
            digits = body[i + 1 : i + 4]
            if len(digits) != 3 or any(c not in "01234567" for c in digits) or digits > "377":
                raise TemplateError(f"bad octal escape in a string: {body[i : i + 4]!r}")
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise TemplateError(f"unknown escape sequence in a string: {body[i : i + 2]!r}")
    return "".join(out)
