"""Chat templates: the SmolLM2 and Qwen2.5-Coder GGUFs' own templates against llama.cpp's
renders, the built-in
Gemma format, the HF-compatible environment, and the sandbox against template injection."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from conftest import fixture

from loaders.chat_template import BUILTIN, ChatTemplate, builtin_template, template_for
from quant.errors import InvalidParameterError, TemplateError

SMOLLM2_CASES = fixture("smollm2")["chat_template"]
QWEN_CODER_CASES = fixture("qwen_coder")["chat_template"]
USER = [{"role": "user", "content": "Hi"}]


def _gguf_metadata(path: Path) -> dict:
    """The GGUF's metadata through tandem's loader when it exists, else gguf's reader."""
    try:
        from loaders.gguf_file import GGUFFile
    except ImportError:
        import gguf

        reader = gguf.GGUFReader(str(path))
        keys = ("general.architecture", "tokenizer.chat_template", "tokenizer.ggml.bos_token_id")
        return {k: reader.fields[k].contents() for k in keys if k in reader.fields}
    with GGUFFile(path) as f:
        return {k: v for k, v in f.metadata.items() if k != "tokenizer.ggml.tokens"}


@pytest.fixture(scope="module")
def smollm2_template(smollm2_path: Path) -> ChatTemplate:
    metadata = _gguf_metadata(smollm2_path)
    assert isinstance(metadata["tokenizer.chat_template"], str)
    arch = metadata["general.architecture"]
    return template_for(metadata, arch, bos_token="<|im_start|>", eos_token="<|im_end|>")


# ---------------------------------------------------------------- reference renders


@pytest.mark.parametrize("case", SMOLLM2_CASES, ids=lambda c: f"{len(c['messages'])}msg")
def test_smollm2_template_matches_llama_cpp(smollm2_template: ChatTemplate, case: dict) -> None:
    assert smollm2_template.render(case["messages"], add_generation_prompt=True) == case["prompt"]


@pytest.mark.parametrize("case", QWEN_CODER_CASES, ids=lambda c: f"{len(c['messages'])}msg")
def test_qwen_coder_template_matches_llama_cpp(qwen_coder_path: Path, case: dict) -> None:
    metadata = _gguf_metadata(qwen_coder_path)
    template = template_for(metadata, "qwen2", bos_token="", eos_token="<|im_end|>")
    assert template.render(case["messages"], add_generation_prompt=True) == case["prompt"]


def test_smollm2_without_generation_prompt(smollm2_template: ChatTemplate) -> None:
    out = smollm2_template.render(USER, add_generation_prompt=False)
    assert out.endswith("<|im_start|>user\nHi<|im_end|>\n")


# ---------------------------------------------------------------- built-ins

GEMMA = ChatTemplate(builtin_template("gemma3"), bos_token="<bos>", eos_token="<eos>")


def test_gemma_system_and_user() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
    ]
    assert GEMMA.render(messages) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nName a color.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_multi_turn_without_generation_prompt() -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert GEMMA.render(messages, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nTell me a joke.<end_of_turn>\n"
    )


def test_gemma_generation_prompt_and_trim() -> None:
    assert GEMMA.render([{"role": "user", "content": "  Hi\n"}], add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_refuses_non_alternating_roles() -> None:
    with pytest.raises(TemplateError, match="alternate"):
        GEMMA.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gemma_family_uses_gemma(arch: str) -> None:
    assert builtin_template(arch) == BUILTIN["gemma3"]


def test_other_arch_uses_chatml() -> None:
    out = ChatTemplate(builtin_template("qwen2")).render(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    )
    assert (
        out
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_gemma3_gguf_without_template_gets_gemma_format(gemma3_path: Path) -> None:
    metadata = _gguf_metadata(gemma3_path)
    assert "tokenizer.chat_template" not in metadata  # llama.cpp would fall back to ChatML
    template = template_for(metadata, metadata["general.architecture"], "<bos>", "<eos>")
    assert (
        template.render(USER) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_template_for_prefers_metadata() -> None:
    own = template_for(
        {"tokenizer.chat_template": "own:{{ messages[0].content }}"}, "gemma3", "", ""
    )
    assert own.render(USER) == "own:Hi"
    raw = template_for({"tokenizer.chat_template": b"raw:{{ bos_token }}"}, "llama", "<s>", "")
    assert raw.render(USER) == "raw:<s>"


def test_template_for_falls_back_to_builtin() -> None:
    assert (
        template_for({}, "gemma3", "<bos>", "<eos>").render(USER).startswith("<bos><start_of_turn>")
    )
    assert (
        template_for({"tokenizer.chat_template": ""}, "llama", "", "")
        .render(USER)
        .startswith("<|im_start|>user")
    )


# ---------------------------------------------------------------- the HF environment


def test_tojson_keeps_non_ascii_and_is_not_html_escaped() -> None:
    t = ChatTemplate(
        "{{ messages[0].content | tojson }}|{{ {'b': 1, 'a': [1]} | tojson(indent=1) }}"
    )
    out = t.render([{"role": "user", "content": "héllo 日本 <&>"}])
    assert out == '"héllo 日本 <&>"|{\n "b": 1,\n "a": [\n  1\n ]\n}'


def test_raise_exception_surfaces_the_template_message() -> None:
    t = ChatTemplate("{{ raise_exception('Only user and assistant roles are supported!') }}")
    with pytest.raises(TemplateError, match="Only user and assistant roles are supported!"):
        t.render(USER)


def test_strftime_now_and_extra_variables() -> None:
    t = ChatTemplate("{{ strftime_now('%Y') }}|{{ tools is none }}|{{ enable_thinking }}")
    year = str(datetime.datetime.now().year)
    assert t.render(USER, enable_thinking=False) == f"{year}|True|False"
    assert t.render(USER, tools=[{"type": "function"}], enable_thinking=1).endswith("|False|1")


def test_trim_blocks_lstrip_blocks_and_loopcontrols() -> None:
    t = ChatTemplate(
        "{% for m in messages %}\n    {% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{{ m.role }}\n{% endfor %}\n"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert t.render(messages) == "user\n"


def test_generation_tag_renders_its_body() -> None:
    t = ChatTemplate("{% generation %}{{ messages[0].content }}{% endgeneration %}")
    assert t.render(USER) == "Hi"


def test_syntax_error_at_construction_says_where() -> None:
    with pytest.raises(
        TemplateError, match=r"syntax error at line 2: .{{ m.content }.: unexpected"
    ):
        ChatTemplate("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(TemplateError, match="line 1"):
        ChatTemplate("{% if x %}unterminated")


@pytest.mark.parametrize(
    "source",
    [
        "{{ nothing.here }}",
        "{{ 1 / 0 }}",
        "{{ messages + 1 }}",
        "{{ messages[0]['content'] | int(base=99) | tojson(bad=1) }}",
    ],
)
def test_render_failures_are_template_errors(source: str) -> None:
    with pytest.raises(TemplateError, match="chat template"):
        ChatTemplate(source).render(USER)


@pytest.mark.parametrize(
    "messages, what",
    [
        ("Hi", "non-empty list"),
        ([], "empty"),
        (["Hi"], r"messages\[0\]"),
        ([{"content": "Hi"}], r"\['role'\].*missing"),
        ([{"role": "user", "content": None}], "NoneType"),
        (
            [{"role": "user", "content": "a"}, {"role": 1, "content": "b"}],
            r"messages\[1\]\['role'\]",
        ),
    ],
)
def test_bad_messages_are_refused(messages: object, what: str) -> None:
    with pytest.raises(InvalidParameterError, match=what):
        GEMMA.render(messages)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the sandbox


def _payloads(marker: Path) -> list[str]:
    """Variants of the CVE-2024-34359 server-side template injection (llama-cpp-python, 2024)."""
    cmd = f"os').popen('touch {marker}').read()"
    imp = f"['__import__']('{cmd}"
    return [
        "{% for x in ().__class__.__base__.__subclasses__() %}{% if 'warning' in x.__name__ %}"
        "{{ x()._module.__builtins__" + imp + " }}{% endif %}{% endfor %}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == '_wrap_close' %}"
        "{{ c.__init__.__globals__['popen']('touch "
        + str(marker)
        + "').read() }}{% endif %}{% endfor %}",
        "{{ self.__init__.__globals__.__builtins__" + imp + " }}",
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}",
        "{{ lipsum.__globals__['os'].popen('touch " + str(marker) + "').read() }}",
        "{{ raise_exception.__globals__['__builtins__']" + imp + " }}",
        "{{ (messages | attr('__class__') | attr('__base__')) }}",
        "{{ '{0.__class__.__base__}'.format(messages) }}",
        "{{ strftime_now.__globals__ }}",
    ]


@pytest.mark.parametrize("index", range(len(_payloads(Path("/x")))))
def test_ssti_payloads_raise_and_run_nothing(tmp_path: Path, index: int) -> None:
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[index]
    with pytest.raises(TemplateError, match="sandbox forbids"):
        ChatTemplate(payload).render(USER)
    assert not marker.exists()


def test_payload_in_message_content_is_just_text(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    content = "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
    out = GEMMA.render([{"role": "user", "content": content}])
    assert content in out and not marker.exists()


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
        "{% set _ = messages[0].update({'role': 'system'}) %}",
        "{{ messages.pop() }}",
    ],
)
def test_mutation_is_refused(source: str) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TemplateError, match="unsafe"):
        ChatTemplate(source).render(messages)
    assert messages == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "source", ["{{ 'a' * 10 ** 9 }}", "{{ [1] * 100000000 }}", "{{ 10 ** 100000 }}"]
)
def test_memory_bombs_are_refused(source: str) -> None:
    with pytest.raises(TemplateError, match="too large"):
        ChatTemplate(source).render(USER)
