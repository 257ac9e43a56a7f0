"""The Modelfile parser: text (ollama's grammar) → Modelfile, with line-numbered errors.

    # comment                      a line whose first non-blank character is #
    INSTRUCTION arguments          keyword case-insensitive, then a space or tab

Values are read as values.py describes (bare, "quoted", \"\"\"multi-line\"\"\"). Every
error is a ModelfileError carrying the line of the instruction at fault: unknown
instruction, unknown parameter, bad value, bad MESSAGE role, missing value, unterminated
quote; a Modelfile without FROM fails with no line. Files may be UTF-8 (with or without a
BOM) or UTF-16 with a BOM, as ollama reads them; line ends may be \\n, \\r\\n or \\r.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from modelfiles import parameters as params
from modelfiles.go_template import translate
from modelfiles.modelfile import ROLES, Modelfile
from modelfiles.values import read_value
from quant.errors import InvalidParameterError, ModelfileError, TemplateError

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE")
# ollama's other instructions: REQUIRES is only ollama's version check; the rest need
# machinery tandem does not have.
_IGNORED_INSTRUCTIONS = ("REQUIRES",)
_UNSUPPORTED_INSTRUCTIONS = ("DRAFT", "RENDERER", "PARSER")
_WORD = re.compile(r"[A-Za-z0-9_]+")


def read_modelfile(path: str | Path) -> Modelfile:
    """Parse the Modelfile at `path`."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ModelfileError(f"cannot read {path}: {err.strerror or err}") from None
    return parse_modelfile(decode(raw, path))


def decode(raw: bytes, path: Path | str = "the Modelfile") -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise ModelfileError(f"{path} is not UTF-8 (or UTF-16 with a BOM) text: {err}") from None


class _Lines:
    """The Modelfile's lines with a cursor; `line_no` is 1-based."""

    def __init__(self, text: str) -> None:
        self.lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.index = -1

    @property
    def line_no(self) -> int:
        return self.index + 1

    def next(self) -> str | None:
        self.index += 1
        return self.lines[self.index] if self.index < len(self.lines) else None


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text; ModelfileError (with the line) on anything wrong."""
    lines = _Lines(text)
    mf = Modelfile(from_="")
    while (line := lines.next()) is not None:
        body = line.lstrip(" \t")
        if not body or body.startswith("#"):
            continue
        keyword, _, rest = _split(body)
        _instruction(mf, keyword, rest, lines)
    if not mf.from_line:
        raise ModelfileError("there is no FROM line; add `FROM <model name or path to a .gguf>`")
    return mf


def _split(text: str) -> tuple[str, str, str]:
    """(first word, separator, rest) split at the first space or tab."""
    match = re.search(r"[ \t]", text)
    if not match:
        return text, "", ""
    return text[: match.start()], match.group(), text[match.end() :]


def _instruction(mf: Modelfile, keyword: str, rest: str, lines: _Lines) -> None:
    line_no, upper = lines.line_no, keyword.upper()
    if upper in _UNSUPPORTED_INSTRUCTIONS:
        raise ModelfileError(
            f"{upper} is an ollama instruction tandem does not support; remove it", line_no
        )
    if upper not in INSTRUCTIONS + _IGNORED_INSTRUCTIONS:
        raise ModelfileError(
            f"unknown instruction {keyword!r}; use one of {', '.join(INSTRUCTIONS)}", line_no
        )
    name = ""  # PARAMETER's name or MESSAGE's role
    if upper in ("PARAMETER", "MESSAGE"):
        name, _, rest = _split(rest.lstrip(" \t"))
        if not name:
            what = "a parameter name" if upper == "PARAMETER" else "a role"
            raise ModelfileError(f"{upper} needs {what} and a value", line_no)
    if not rest.strip():
        where = {"PARAMETER": " after the parameter name", "MESSAGE": " after the role"}
        raise ModelfileError(f"{upper} needs a value{where.get(upper, '')}", line_no)
    value = read_value(rest, lines.next, line_no)
    if not value and upper in ("FROM", "ADAPTER"):
        raise ModelfileError(f"{upper} needs a model name or a path, not an empty string", line_no)
    if upper == "PARAMETER":
        _parameter(mf, name, value, line_no)
    elif upper == "MESSAGE":
        _message(mf, name, value, line_no)
    elif upper == "REQUIRES":
        mf.warnings.append(f"line {line_no}: REQUIRES (an ollama version) is ignored")
    else:
        _HANDLERS[upper](mf, value, line_no)


def _from(mf: Modelfile, value: str, line_no: int) -> None:
    if mf.from_line:
        raise ModelfileError(
            f"a second FROM (the first is on line {mf.from_line}); tandem "
            "builds a model from one base: keep one FROM",
            line_no,
        )
    mf.from_, mf.from_line = value, line_no


def _parameter(mf: Modelfile, name: str, text: str, line_no: int) -> None:
    key = name.lower()
    if not _WORD.fullmatch(name) or not params.known(key):
        known = ", ".join(params.PARAMETERS)
        raise ModelfileError(f"unknown parameter {name!r}; known parameters: {known}", line_no)
    try:
        value = params.parse_value(key, text)  # typed, in range, and supported
    except (ValueError, InvalidParameterError) as err:
        raise ModelfileError(f"bad value for PARAMETER {key}: {err}", line_no) from None
    if params.PARAMETERS[key].repeated:
        mf.parameters.setdefault(key, []).append(value)
    else:
        mf.parameters[key] = value


def _template(mf: Modelfile, source: str, line_no: int) -> None:
    """Check the Go template now, so a bad one fails at its line, not at the first chat."""
    try:
        translate(source)
    except TemplateError as err:
        raise ModelfileError(f"bad TEMPLATE: {err}", line_no) from None
    mf.template = source


def _message(mf: Modelfile, role: str, content: str, line_no: int) -> None:
    if role.lower() not in ROLES:
        raise ModelfileError(f"MESSAGE role {role!r} is not one of {', '.join(ROLES)}", line_no)
    mf.messages.append({"role": role.lower(), "content": content})


def _set(attr: str) -> Callable[[Modelfile, str, int], None]:
    def handler(mf: Modelfile, value: str, line_no: int) -> None:
        setattr(mf, attr, value)

    return handler


def _append(attr: str) -> Callable[[Modelfile, str, int], None]:
    def handler(mf: Modelfile, value: str, line_no: int) -> None:
        getattr(mf, attr).append(value)

    return handler


_HANDLERS = {
    "FROM": _from,
    "TEMPLATE": _template,
    "SYSTEM": _set("system"),
    "ADAPTER": _append("adapters"),
    "LICENSE": _append("license"),
}
