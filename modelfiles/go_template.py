"""Go text/template → Jinja: the subset ollama's Modelfile TEMPLATEs use, translated so that
the result runs only in jinja2's ImmutableSandboxedEnvironment (loaders/chat_template.py).

Supported (Go semantics kept):

    {{ .System }} {{ .Prompt }} {{ .Response }} {{ .Messages }} ...  fields of the data (dot)
    {{ $.System }} {{ $var }} {{ $var.Field }} {{ (pipeline).Field }}
    {{ if P }} {{ else if P }} {{ else }} {{ end }}
    {{ range P }} / {{ range $i, $m := P }} / {{ range $m := P }} ... {{ else }} {{ end }}
    {{ with P }} ... {{ else }} {{ end }},  {{ break }}, {{ continue }}
    {{ $x := P }}, {{ $x = P }}
    and or not eq ne lt le gt ge len index slice print println printf json;  a | f b
    "strings" `raw strings` numbers true false nil;  {{/* comments */}}
    {{- and -}} trimming, applied to the neighbouring text exactly as Go does

Not supported (TemplateError naming it): define, template, block, call, html, js, urlquery,
methods. Text and values come out through `_go_print` (Go's formatting of booleans, nil
and lists); helpers are supplied at render time by prompt_template.py. Known difference:
a variable reassigned (`$x = ...`) inside a range or with does not change it outside.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from modelfiles.go_tokens import TOKEN, Token, number, unquote
from quant.errors import TemplateError

_COMPARE = {"ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_HELPERS = {
    "eq": "_go_eq",
    "len": "_go_len",
    "index": "_go_index",
    "slice": "_go_slice",
    "print": "_go_sprint",
    "println": "_go_sprintln",
    "printf": "_go_printf",
    "json": "_go_json",
}
_SPACE = " \t\r\n"  # what {{- and -}} trim (Go's definition of white space there)
_UNSUPPORTED = ("define", "template", "block", "call", "html", "js", "urlquery")


@dataclass
class _Block:
    kind: str  # "if" | "range" | "with"
    dot: str  # the dot outside the block (restored by else and end)
    has_else: bool = False


@dataclass
class Translation:
    jinja: str
    fields: set[str] = field(default_factory=set)  # every .Field name used, e.g. {"Messages"}


def translate(source: str) -> Translation:
    """The Jinja source for a Go template; TemplateError with the line on anything outside
    the supported subset."""
    return _Translator(source).run()


class _Translator:
    def __init__(self, source: str) -> None:
        self.source = source
        self.out: list[str] = []
        self.blocks: list[_Block] = []
        self.dot = "_root"
        self.fields: set[str] = set()
        self.counter = 0
        self.line = 1

    # ---- the template: text and actions -------------------------------------------
    def run(self) -> Translation:
        pos, trim_next = 0, False
        while pos < len(self.source):
            start = self.source.find("{{", pos)
            text = self.source[pos:] if start < 0 else self.source[pos:start]
            if start < 0:
                self._text(text.lstrip(_SPACE) if trim_next else text)
                break
            self.line = self.source.count("\n", 0, start) + 1
            trim_before = self.source.startswith(("{{- ", "{{-\t", "{{-\n"), start)
            if trim_next:
                text = text.lstrip(_SPACE)
            self._text(text.rstrip(_SPACE) if trim_before else text)
            pos, trim_next = self._action(start + (4 if trim_before else 2))
        if self.blocks:
            raise self._error(
                f"{{{{ {self.blocks[-1].kind} }}}} is never closed with {{{{ end }}}}"
            )
        return Translation("".join(self.out), self.fields)

    def _text(self, text: str) -> None:
        if text:
            self.out.append("{{ " + json.dumps(text, ensure_ascii=False) + " }}")

    def _action(self, pos: int) -> tuple[int, bool]:
        """Translate the action whose body starts at `pos`; (position after it, trim after)."""
        if self.source.startswith("/*", self._skip_space(pos)):
            return self._comment(self._skip_space(pos))
        tokens, end, trim_after = self._lex(pos)
        self._statement(tokens)
        return end, trim_after

    def _skip_space(self, pos: int) -> int:
        while pos < len(self.source) and self.source[pos] in _SPACE:
            pos += 1
        return pos

    def _comment(self, pos: int) -> tuple[int, bool]:
        close = self.source.find("*/", pos + 2)
        if close < 0:
            raise self._error("a {{/* comment */}} is never closed")
        rest = self._skip_space(close + 2)
        if self.source.startswith("-}}", rest) and rest > close + 2:
            return rest + 3, True
        if self.source.startswith("}}", close + 2):
            return close + 4, False
        raise self._error("a comment must end with */}}")

    def _lex(self, pos: int) -> tuple[list[Token], int, bool]:
        tokens: list[Token] = []
        while True:
            if pos >= len(self.source):
                raise self._error("an action {{ ... is never closed with }}")
            if self.source.startswith("}}", pos):
                return tokens, pos + 2, False
            if self.source[pos] in _SPACE and self.source.startswith("-}}", self._skip_space(pos)):
                return tokens, self._skip_space(pos) + 3, True
            match = TOKEN.match(self.source, pos)
            if not match:
                raise self._error(f"unexpected {self.source[pos : pos + 10]!r} in an action")
            if match.lastgroup != "space":
                tokens.append(Token(match.lastgroup or "", match.group()))
            pos = match.end()

    def _error(self, message: str) -> TemplateError:
        return TemplateError(f"TEMPLATE line {self.line}: {message}")

    # ---- statements --------------------------------------------------------------
    def _statement(self, tokens: list[Token]) -> None:
        if not tokens:
            raise self._error("empty action {{ }}")
        head = tokens[0].text if tokens[0].kind == "ident" else ""
        if head in _UNSUPPORTED:
            raise self._error(f"{head!r} is not supported in tandem's Go-template subset")
        handler = {
            "if": self._if,
            "else": self._else,
            "end": self._end,
            "range": self._range,
            "with": self._with,
            "break": self._loop_control,
            "continue": self._loop_control,
        }.get(head)
        if handler:
            handler(tokens)
        elif len(tokens) >= 2 and tokens[0].kind == "var" and tokens[1].text in (":=", "="):
            self.out.append(
                f"{{% set {self._var(tokens[0].text)} = {self._pipeline(tokens[2:])} %}}"
            )
        else:
            self.out.append("{{ _go_print(" + self._pipeline(tokens) + ") }}")

    def _if(self, tokens: list[Token]) -> None:
        self.blocks.append(_Block("if", self.dot))
        self.out.append(f"{{% if {self._pipeline(tokens[1:])} %}}")

    def _else(self, tokens: list[Token]) -> None:
        if not self.blocks or self.blocks[-1].has_else:
            raise self._error("{{ else }} outside an if, range or with")
        block = self.blocks[-1]
        self.dot = block.dot
        if len(tokens) > 1 and tokens[1].text == "if" and block.kind == "if":
            self.out.append(f"{{% elif {self._pipeline(tokens[2:])} %}}")
            return
        if len(tokens) > 1:
            raise self._error("only {{ else }} and, in an if, {{ else if ... }} are supported")
        block.has_else = True
        self.out.append("{% else %}")

    def _end(self, tokens: list[Token]) -> None:
        if len(tokens) > 1 or not self.blocks:
            raise self._error("{{ end }} without an open if, range or with")
        block = self.blocks.pop()
        self.dot = block.dot
        self.out.append(
            {"if": "{% endif %}", "range": "{% endfor %}", "with": "{% endif %}{% endwith %}"}[
                block.kind
            ]
        )

    def _range(self, tokens: list[Token]) -> None:
        rest, names = tokens[1:], []
        if any(t.kind == "declare" for t in rest):
            split = next(i for i, t in enumerate(rest) if t.kind == "declare")
            names = [t.text for t in rest[:split] if t.kind == "var"]
            if not 1 <= len(names) <= 2:
                raise self._error("range declares one or two variables: $i, $m := ...")
            rest = rest[split + 1 :]
        self.counter += 1
        key = self._var(names[0]) if len(names) == 2 else f"_k{self.counter}"
        item = self._var(names[-1]) if names else f"_d{self.counter}"
        self.out.append(f"{{% for {key}, {item} in _go_range({self._pipeline(rest)}) %}}")
        self.blocks.append(_Block("range", self.dot))
        self.dot = item

    def _with(self, tokens: list[Token]) -> None:
        self.counter += 1
        name = f"_w{self.counter}"
        self.out.append(f"{{% with {name} = {self._pipeline(tokens[1:])} %}}{{% if {name} %}}")
        self.blocks.append(_Block("with", self.dot))
        self.dot = name

    def _loop_control(self, tokens: list[Token]) -> None:
        if not any(b.kind == "range" for b in self.blocks) or len(tokens) > 1:
            raise self._error(f"{{{{ {tokens[0].text} }}}} outside a range")
        self.out.append(f"{{% {tokens[0].text} %}}")

    # ---- expressions ---------------------------------------------------------------
    def _pipeline(self, tokens: list[Token]) -> str:
        """`cmd | cmd ...`: each later command gets the value so far as its last argument."""
        if not tokens:
            raise self._error("missing value")
        commands: list[list[Token]] = [[]]
        depth = 0
        for tok in tokens:
            depth += {"(": 1, ")": -1}.get(tok.text, 0) if tok.kind == "punct" else 0
            if tok.text == "|" and tok.kind == "punct" and depth == 0:
                commands.append([])
            else:
                commands[-1].append(tok)
        value = self._command(commands[0], None)
        for cmd in commands[1:]:
            value = self._command(cmd, value)
        return value

    def _command(self, tokens: list[Token], piped: str | None) -> str:
        if not tokens:
            raise self._error("empty command in a pipeline")
        if tokens[0].kind == "ident" and tokens[0].text not in ("true", "false", "nil"):
            args = self._operands(tokens[1:])
            return self._call(tokens[0].text, args + ([piped] if piped is not None else []))
        operands = self._operands(tokens)
        if len(operands) != 1 or piped is not None:
            raise self._error("a value cannot take arguments (is a function name missing?)")
        return operands[0]

    def _call(self, name: str, args: list[str]) -> str:
        if name in _UNSUPPORTED:
            raise self._error(f"function {name!r} is not supported")
        if name in ("and", "or"):
            if len(args) < 1:
                raise self._error(f"{name} needs arguments")
            return "(" + f" {name} ".join(args) + ")"
        if name == "not":
            if len(args) != 1:
                raise self._error("not takes one argument")
            return f"(not {args[0]})"
        if name in _COMPARE:
            if len(args) != 2:
                raise self._error(f"{name} takes two arguments")
            return f"({args[0]} {_COMPARE[name]} {args[1]})"
        if name in _HELPERS:
            return f"{_HELPERS[name]}({', '.join(args)})"
        raise self._error(f"unknown function {name!r}")

    def _operands(self, tokens: list[Token]) -> list[str]:
        out, i = [], 0
        while i < len(tokens):
            tok = tokens[i]
            if tok.kind == "punct" and tok.text == "(":
                close = self._matching(tokens, i)
                expr, i = "(" + self._pipeline(tokens[i + 1 : close]) + ")", close + 1
            else:
                expr, i = self._operand(tok), i + 1
            if tok.kind in ("punct", "var") and i < len(tokens) and tokens[i].kind == "field":
                expr, i = self._fields(expr, tokens[i].text), i + 1  # $m.Role, (x).Name
            out.append(expr)
        return out

    def _matching(self, tokens: list[Token], open_at: int) -> int:
        depth = 0
        for j in range(open_at, len(tokens)):
            if tokens[j].kind == "punct":
                depth += {"(": 1, ")": -1}.get(tokens[j].text, 0)
                if depth == 0:
                    return j
        raise self._error("a ( is never closed")

    def _operand(self, tok: Token) -> str:
        if tok.kind == "field":
            return self._fields(self.dot, tok.text)
        if tok.kind == "dot":
            return self.dot
        if tok.kind == "var":
            return "_root" if tok.text == "$" else self._var(tok.text)
        if tok.kind in ("string", "raw", "number"):
            try:
                if tok.kind == "number":
                    return number(tok.text)
                return json.dumps(unquote(tok.text), ensure_ascii=False)
            except TemplateError as err:
                raise self._error(str(err)) from None
        if tok.kind == "ident" and tok.text in ("true", "false", "nil"):
            return {"true": "true", "false": "false", "nil": "none"}[tok.text]
        if tok.kind == "ident":
            return self._call(tok.text, [])
        raise self._error(f"unexpected {tok.text!r}")

    def _fields(self, base: str, chain: str) -> str:
        names = chain.strip(".").split(".")
        self.fields.update(names)
        return base + "".join(f'["{n}"]' for n in names)

    def _var(self, name: str) -> str:
        if name == "$":
            raise self._error("$ cannot be assigned")
        return "_v_" + name[1:]
