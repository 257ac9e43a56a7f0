"""Modelfile values: how an instruction's argument is read from lines, and written back.

ollama's rules (parser/parser.go), which these follow:

- A bare value runs to the end of its line; surrounding spaces and tabs are dropped.
- A value whose text starts with `"` is quoted: it ends at the first line end where the text
  so far, stripped, ends with `"` (and holds at least the two quotes). Everything between
  the quotes is kept verbatim, newlines and inner quotes included; there are no escapes.
- A value starting with `\"\"\"` is the same with `\"\"\"` for both quotes (at least six
  characters), so text holding single `"` needs no care.

`quote(s)` writes a value so that reading it back gives `s` exactly: bare when that is safe,
else the first of "..." and \"\"\"...\"\"\" that reads back the same.
"""

from __future__ import annotations

from collections.abc import Callable

from quant.errors import ModelfileError

# (next line or None at end of file) — what read_value pulls continuation lines from
NextLine = Callable[[], "str | None"]


def read_value(first: str, next_line: NextLine, line_no: int) -> str:
    """The value that starts with `first` (the rest of the instruction's line), reading more
    lines from `next_line` while a quote is open. `line_no` is used for errors."""
    text = first.strip()
    if not text.startswith('"'):
        return text
    delim = '"""' if text.startswith('"""') else '"'
    acc = first
    while True:
        text = acc.strip()
        if len(text) >= 2 * len(delim) and text.endswith(delim):
            return text[len(delim) : -len(delim)]
        more = next_line()
        if more is None:
            raise ModelfileError(
                f"the value opened with {delim} here is never closed; end it with {delim} "
                "at the end of a line",
                line_no,
            )
        acc += "\n" + more


def _reads_back(candidate: str, value: str) -> bool:
    lines = iter(candidate.split("\n")[1:])
    try:
        return read_value(candidate.split("\n")[0], lambda: next(lines, None), 0) == value
    except ModelfileError:
        return False


def quote(value: str) -> str:
    """`value` as Modelfile text that reads back as exactly `value`."""
    if "\r" in value:
        raise ModelfileError(
            f"cannot write {value[:40]!r}… in a Modelfile: it holds a carriage "
            "return (Modelfiles end lines at \\r)"
        )
    if value and value == value.strip() and "\n" not in value and not value.startswith('"'):
        return value
    for delim in ('"', '"""'):
        candidate = delim + value + delim
        if _reads_back(candidate, value):
            return candidate
    raise ModelfileError(
        f"cannot write {value[:40]!r}… in a Modelfile: a line of it ends with "
        'both " and """ (Modelfile values have no escapes)'
    )
