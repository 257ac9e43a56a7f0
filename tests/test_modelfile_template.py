"""Modelfile TEMPLATEs: Go text/template (ollama's subset) translated to sandboxed Jinja.

Checked against an independent oracle where one exists (the ChatML Jinja template tandem
already renders for GGUFs), else against outputs worked out by hand from Go's and ollama's
rules (trim markers, per-turn rendering cut at .Response, message collation)."""

from __future__ import annotations

import pytest

from loaders.chat_template import BUILTIN, ChatTemplate
from modelfiles.go_template import translate
from modelfiles.prompt_template import GoTemplate
from quant.errors import TemplateError

# ChatML as ollama's library writes it in Go-template form
CHATML_GO = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_end|>
<|im_start|>assistant
{{ end }}
{{- end }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "What's 2+2? {{ x }}"},
    ],
    [{"role": "user", "content": 'ünïcødé 🦜 and "quotes" and {% raw %}'}],
]


def render(source: str, messages=None, **root) -> str:
    """Render a translated Go template with `root` as its data (dot)."""
    from modelfiles.prompt_template import HELPERS

    jinja = ChatTemplate(translate(source).jinja)
    return jinja.render(messages or [{"role": "user", "content": ""}], _root=root, **HELPERS)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_go_template_equals_the_jinja_chatml(messages):
    expected = ChatTemplate(BUILTIN["chatml"]).render(messages, add_generation_prompt=True)
    assert GoTemplate(CHATML_GO).render(messages) == expected


def test_legacy_template_renders_per_turn_and_stops_where_the_answer_starts():
    legacy = (
        "{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}{{ if .Prompt }}"
        "<|user|>\n{{ .Prompt }}</s>\n{{ end }}<|assistant|>\n{{ .Response }}</s>\n"
    )
    messages = CONVERSATIONS[2]
    assert GoTemplate(legacy).render(messages) == (
        "<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\nYo</s>\n"
        "<|user|>\nWhat's 2+2? {{ x }}</s>\n<|assistant|>\n"
    )


def test_template_without_response_gets_it_appended_as_ollama_does():
    # turn 1: "S Hi" + the appended {{ .Response }} ("Yo"); turn 2: " <Q>" cut at Response
    messages = CONVERSATIONS[2]
    assert (
        GoTemplate("{{ .System }} {{ .Prompt }}").render(messages) == "S HiYo What's 2+2? {{ x }}"
    )


def test_messages_template_collates_roles_and_joins_system():
    source = "[{{ .System }}]{{ range .Messages }}<{{ .Role }}:{{ .Content }}>{{ end }}"
    messages = [
        {"role": "system", "content": "a"},
        {"role": "system", "content": "b"},
        {"role": "user", "content": "u1"},
        {"role": "user", "content": "u2"},
    ]
    assert GoTemplate(source).render(messages) == "[a\n\nb]<system:a\n\nb><user:u1\n\nu2>"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("a  {{- .X }}", "aX"),
        ("a  {{- .X -}}  \n\t b", "aXb"),
        ("a {{.X}} b", "a X b"),
        ("a\n{{- /* gone */ -}}\nb", "ab"),
        ("a{{/* gone */}}b", "ab"),
        ("{{ if .Y }}y{{ else if .X }}x{{ else }}n{{ end }}", "x"),
        ("{{ if and .X .Y }}both{{ else if or .Y .X }}one{{ end }}", "one"),
        ("{{ if not .Y }}not{{ end }}", "not"),
        ('{{ if eq .X "nope" "X" }}member{{ end }}', "member"),
        ('{{ if ne .X "X" }}ne{{ else }}eq{{ end }}', "eq"),
        (
            "{{ if lt 1 2 }}{{ if ge 2 2 }}{{ if gt 3 2 }}{{ if le 1 1 }}ok{{ end }}{{ end }}{{ end }}"
            "{{ end }}",
            "ok",
        ),
        ("{{ len .L }} {{ index .L 1 }} {{ slice .L 1 }} {{ slice .L 0 1 }}", "3 b [b c] [a]"),
        ("{{ range $i, $v := .L }}{{ $i }}={{ $v }};{{ end }}", "0=a;1=b;2=c;"),
        ('{{ range .L }}{{ if eq . "b" }}{{ break }}{{ end }}{{ . }}{{ end }}', "a"),
        ('{{ range .L }}{{ if eq . "b" }}{{ continue }}{{ end }}{{ . }}{{ end }}', "ac"),
        ("{{ range .E }}x{{ else }}empty{{ end }}", "empty"),
        ("{{ with .X }}[{{ . }}]{{ end }}{{ with .Y }}y{{ else }}{{ .X }}{{ end }}", "[X]X"),
        ("{{ $v := .X }}{{ $v }}{{ $.X }}", "XX"),
        ("{{ range .M }}{{ .Role }}{{ $.X }}{{ end }}", "userX"),
        ("{{ (index .M 0).Role }}", "user"),
        ('{{ printf "%s-%d-%q %%" .X 7 "q" }}', 'X-7-"q" %'),
        ("{{ json .M }}", '[{"Role":"user"}]'),
        ("{{ .L | len }}", "3"),
        ("{{ true }} {{ false }} {{ 1.5 }} {{ 0x10 }} {{ nil }}", "true false 1.5 16 "),
        ('{{ "tab\\there" }} {{ `raw\\n` }}', "tab\there raw\\n"),
        ("{{ .Missing }}|{{ .M.Nope }}", "|"),
        ('{{ print 1 2 }} {{ print "a" "b" }}', "1 2 ab"),
    ],
)
def test_constructs(source, expected):
    data = {"X": "X", "Y": "", "L": ["a", "b", "c"], "E": [], "M": [{"Role": "user"}]}
    assert render(source, **data) == expected


def test_text_that_looks_like_jinja_is_only_text():
    out = render("{% for x in range(3) %}x{% endfor %} {# c #} }} {{ .X }}", X="{{ 7 * 7 }}")
    assert out == "{% for x in range(3) %}x{% endfor %} {# c #} }} {{ 7 * 7 }}"


def test_the_sandbox_still_guards_field_access():
    # a field named like a Python dunder reaches only the sandbox's refusal
    with pytest.raises(TemplateError, match="sandbox|unsafe"):
        GoTemplate("{{ range .Messages }}{{ .Content.__class__ }}{{ end }}").render(
            CONVERSATIONS[0]
        )


@pytest.mark.parametrize(
    "source, words",
    [
        ('line one\n{{ define "x" }}{{ end }}', ["line 2", "define"]),
        ('{{ template "x" }}', ["template", "not supported"]),
        ("{{ if .X }}open", ["never closed", "end"]),
        ("{{ end }}", ["end", "without"]),
        ("{{ else }}", ["else", "outside"]),
        ("{{ .X ", ["never closed"]),
        ("{{ frobnicate .X }}", ["unknown function", "frobnicate"]),
        ("{{ .X .Y }}", ["cannot take arguments"]),
        ("{{ break }}", ["outside a range"]),
        ("{{ }}", ["empty action"]),
        ("{{ (len .X }}", ["never closed"]),
        ("{{ html .X }}", ["html", "not supported"]),
        ("{{/* open", ["comment", "never closed"]),
    ],
)
def test_unsupported_or_broken_templates_are_typed(source, words):
    with pytest.raises(TemplateError) as info:
        translate(source)
    for word in words:
        assert word in str(info.value), str(info.value)
