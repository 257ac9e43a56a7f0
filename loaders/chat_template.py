"""Chat templates: a GGUF's Jinja `tokenizer.chat_template`, rendered safely.

Templates come from model files, i.e. from strangers, so they are compiled and rendered only
inside jinja2's ImmutableSandboxedEnvironment, set up the way HF transformers renders chat
templates (trim_blocks, lstrip_blocks, loopcontrols, a non-ASCII-preserving `tojson`,
`raise_exception`, `strftime_now`). Every failure while compiling or rendering surfaces as
quant.errors.TemplateError; bad messages as InvalidParameterError.

When a GGUF carries no template, `builtin_template(arch)` supplies one: Gemma's turn format
for the Gemma family, ChatML for everything else.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension

from loaders.template_sandbox import (
    DEFAULT_BUDGET,
    BudgetedSandbox,
    BudgetExceeded,
    RenderBudget,
    check_text,
    render_metered,
)
from quant.errors import InvalidParameterError, TemplateBudgetError, TemplateError

# What every template renders once at load: a render over budget here fails the load.
SAMPLE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
)

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


def _raise_exception(message: Any) -> None:
    check_text(message)
    raise TemplateError(f"chat template refused the messages: {str(message)[:500]}")


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
    if not isinstance(fmt, str) or len(fmt) > 1000:
        raise TemplateError("strftime_now takes a format string of at most 1000 characters")
    return datetime.now().strftime(fmt)


def _environment() -> BudgetedSandbox:
    env = BudgetedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag]
    )
    env.add_filter("tojson", _tojson)
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
        if not isinstance(message.get("role"), str):
            got = "missing" if "role" not in message else type(message["role"]).__name__
            raise InvalidParameterError(f"messages[{i}]['role'] must be a string, got {got}")
        if not _valid_content(message):
            got = "missing" if "content" not in message else type(message["content"]).__name__
            raise InvalidParameterError(
                f"messages[{i}]['content'] must be a string or a list of content parts "
                f"(null or missing only beside tool_calls), got {got}"
            )


def _valid_content(message: dict[str, Any]) -> bool:
    """A string, a list of content-part objects, or nothing in a message making tool calls."""
    content = message.get("content")
    if isinstance(content, str):
        return True
    if isinstance(content, list):
        return all(isinstance(part, dict) for part in content)
    return content is None and bool(message.get("tool_calls"))


class ChatTemplate:
    """A compiled, sandboxed chat template; `render` turns messages into a prompt string."""

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        budget: RenderBudget = DEFAULT_BUDGET,
        check: bool = True,
    ) -> None:
        """Compile `source`; with `check`, also render SAMPLE_CONVERSATION once so that a
        template that cannot render even that within `budget` fails here, at load (a template
        that merely refuses the sample, e.g. one that forbids system messages, is accepted)."""
        if not isinstance(source, str):
            raise TemplateError(f"chat template must be a string, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.budget = budget
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise _syntax_error(source, err) from None
        except jinja2.TemplateError as err:
            raise TemplateError(f"chat template does not compile: {err}") from None
        except RecursionError:
            raise TemplateError("chat template does not compile: nested too deeply") from None
        if check:
            self.check_budget(lambda: self.render([dict(m) for m in SAMPLE_CONVERSATION]))

    @staticmethod
    def check_budget(render: Any) -> None:
        """Run a sample render: over budget raises, any other refusal is the sample's fault."""
        try:
            render()
        except TemplateBudgetError as err:
            raise TemplateBudgetError(f"{err} (rendering a sample conversation at load)") from None
        except TemplateError:
            pass

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
            return render_metered(self._template, self.budget, context, (messages, extra))
        except BudgetExceeded as err:
            raise TemplateBudgetError(
                f"chat template exceeded its render budget: {err}; the template (or a request "
                "this large) cannot be rendered"
            ) from None
        except TemplateError:
            raise
        except SecurityError as err:
            raise TemplateError(
                f"chat template tried something the sandbox forbids: {_short(err)}"
            ) from None
        except jinja2.UndefinedError as err:
            raise TemplateError(f"chat template used an undefined value: {_short(err)}") from None
        except jinja2.TemplateError as err:
            raise TemplateError(f"chat template failed to render: {_short(err)}") from None
        except Exception as err:  # TypeError, KeyError, ZeroDivisionError, ... from template code
            raise TemplateError(
                f"chat template failed to render: {type(err).__name__}: {_short(err)}"
            ) from None


def _short(err: BaseException) -> str:
    text = str(err)
    return text if len(text) <= 500 else text[:500] + "..."


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


_SENTINEL_MARK = "\U0010fffd"  # a private-use character no template transforms


def prompt_ids(
    template: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    max_tokens: int | None = None,
    **extra: Any,
) -> list[int]:
    """Render `messages` with `template` and tokenize the prompt so that only the template's
    own markup can produce control tokens: special-token texts inside message fields (and in
    `extra`, e.g. tools) are tokenized as plain text. BOS is added unless the template wrote
    it. With max_tokens, ContextLengthError once the prompt certainly exceeds it.

    How: such texts are replaced by numbered sentinels before rendering; the rendered text is
    tokenized piece by piece, markup with special-token parsing and each sentinel's original
    text without it (runs of text are still tokenized as one). Content without special-token
    texts renders and tokenizes exactly as before."""
    found: set[str] = set()
    for value in _strings((messages, extra)):
        found.update(tokenizer.special_texts_in(value))
    if not found:
        text = template.render(messages, add_generation_prompt=True, **extra)
        return tokenizer.encode(
            text, add_special=_adds_bos(template, text), parse_special=True, max_tokens=max_tokens
        )
    nonce = f"{secrets.randbelow(10**12):012d}"
    table: list[str] = []
    pattern = re.compile("|".join(re.escape(t) for t in sorted(found, key=lambda t: -len(t))))

    def hide(match: re.Match[str]) -> str:
        table.append(match.group())
        return f"{_SENTINEL_MARK}{nonce}:{len(table) - 1}{_SENTINEL_MARK}"

    def neutral(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(hide, value)
        if isinstance(value, dict):
            return {k: neutral(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [neutral(v) for v in value]
        return value

    text = template.render(
        neutral(messages), add_generation_prompt=True, **{k: neutral(v) for k, v in extra.items()}
    )
    pieces = re.split(f"{_SENTINEL_MARK}{nonce}:(\\d+){_SENTINEL_MARK}", text)
    segments = [
        (piece, True) if k % 2 == 0 else (table[int(piece)], False)
        for k, piece in enumerate(pieces)
        if piece
    ]
    return tokenizer.encode_segments(segments, _adds_bos(template, text), max_tokens)


def _adds_bos(template: Any, text: str) -> bool:
    bos = template.bos_token
    return not (bos and text.startswith(bos))


def _strings(value: Any) -> list[str]:
    out, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return out
