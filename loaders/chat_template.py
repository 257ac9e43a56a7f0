"""Chat templates: a GGUF's Jinja `tokenizer.chat_template`, rendered safely.

Templates come from model files, i.e. from strangers, so they are compiled and rendered only
inside jinja2's ImmutableSandboxedEnvironment, set up the way HF transformers renders chat
templates (trim_blocks, lstrip_blocks, loopcontrols, a non-ASCII-preserving `tojson`,
`raise_exception`, `strftime_now`). Every failure while compiling or rendering surfaces as
runtime.errors.TemplateError; bad messages as InvalidParameterError.

When a GGUF carries no template, `builtin_template(arch)` supplies one: Gemma's turn format
for the Gemma family, ChatML for everything else.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from runtime.errors import InvalidParameterError, TemplateError

# Largest string/list a template may build with `*`, and largest integer with `**`.
_MAX_REPEAT = 1_000_000
_MAX_POW_BITS = 1 << 16

# Gemma's turn format, as published with Gemma 2/3 (tokenizer_config.json): text starts with BOS,
# a system message becomes a prefix (plus a blank line) of the first user turn, the assistant
# role is named `model`, user/model contents are trimmed, and roles must alternate.
_GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_prefix = messages[0]['content'] ~ '\\n\\n' %}"
    "{% set turns = messages[1:] %}"
    "{% else %}"
    "{% set system_prefix = '' %}"
    "{% set turns = messages %}"
    "{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Gemma conversations must alternate user/assistant turns, starting with user') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' ~ role ~ '\\n' ~ (system_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# ChatML (<|im_start|>role\ncontent<|im_end|>\n), llama.cpp's fallback for unknown models.
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BUILTIN: dict[str, str] = {"gemma": _GEMMA, "gemma2": _GEMMA, "gemma3": _GEMMA, "chatml": _CHATML}


def builtin_template(arch: str) -> str:
    """The built-in template for a GGUF architecture: Gemma's for the Gemma family, else ChatML."""
    return BUILTIN.get(arch, _CHATML)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox; it also fails on any unsafe attribute, even one only printed, and
    refuses `*` and `**` results big enough to exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check_repeat(left, right)
            _check_repeat(right, left)
        elif operator == "**" and _is_int(left) and _is_int(right):
            if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > _MAX_POW_BITS:
                raise SecurityError(f"{left} ** {right} is too large for a chat template")
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        """Fail at once (jinja2 would hand back an Undefined that prints as "")."""
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_repeat(seq: Any, count: Any) -> None:
    if isinstance(seq, (str, list, tuple)) and _is_int(count) and len(seq) * count > _MAX_REPEAT:
        raise SecurityError(f"repeating a sequence {count} times is too large for a chat template")


def _raise_exception(message: Any) -> None:
    raise TemplateError(f"chat template refused the messages: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _syntax_error(source: str, err: jinja2.TemplateSyntaxError) -> TemplateError:
    lines = source.splitlines()
    where = f"line {err.lineno}"
    if err.lineno and 0 < err.lineno <= len(lines):
        where += f": {lines[err.lineno - 1].strip()[:120]!r}"
    return TemplateError(f"chat template syntax error at {where}: {err.message}")


def _validate(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError(
            "messages must be a non-empty list of {'role': str, 'content': str} objects, "
            f"got {type(messages).__name__}" + (" (empty)" if isinstance(messages, list) else "")
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidParameterError(
                f"messages[{i}] must be an object with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if key not in message else type(message[key]).__name__
                raise InvalidParameterError(f"messages[{i}]['{key}'] must be a string, got {got}")


class ChatTemplate:
    """A compiled, sandboxed chat template; `render` turns messages into a prompt string."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        if not isinstance(source, str):
            raise TemplateError(f"chat template must be a string, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise _syntax_error(source, err) from None
        except jinja2.TemplateError as err:
            raise TemplateError(f"chat template does not compile: {err}") from None

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text for `messages`; extra keywords (tools=..., ...) reach the template."""
        _validate(messages)
        context: dict[str, Any] = {
            "tools": None,
            "documents": None,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": messages,
            "add_generation_prompt": bool(add_generation_prompt),
        }
        try:
            return self._template.render(**context)
        except TemplateError:
            raise
        except SecurityError as err:
            raise TemplateError(
                f"chat template tried something the sandbox forbids: {err}"
            ) from None
        except jinja2.UndefinedError as err:
            raise TemplateError(f"chat template used an undefined value: {err}") from None
        except jinja2.TemplateError as err:
            raise TemplateError(f"chat template failed to render: {err}") from None
        except Exception as err:  # TypeError, KeyError, ZeroDivisionError, ... from template code
            raise TemplateError(
                f"chat template failed to render: {type(err).__name__}: {err}"
            ) from None


def _metadata_template(metadata: dict[str, Any]) -> str | None:
    value = metadata.get("tokenizer.chat_template")
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    return value if isinstance(value, str) and value.strip() else None


def template_for(
    metadata: dict[str, Any], arch: str, bos_token: str, eos_token: str
) -> ChatTemplate:
    """The GGUF's own tokenizer.chat_template if it has one, else the built-in for `arch`."""
    source = _metadata_template(metadata) or builtin_template(arch)
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token)
