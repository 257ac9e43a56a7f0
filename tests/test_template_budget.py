"""Chat templates (Jinja, and Modelfile Go templates translated to Jinja) render under a step,
time and size budget (issue 13 part 3): every hostile input below used to hang, take tens of
seconds or build hundreds of MB; now each fails fast with a TemplateError, and real templates
(llama.cpp's models/templates, copied into tests/data/templates) still render."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders.chat_template import ChatTemplate
from modelfiles.go_template import translate
from modelfiles.prompt_template import GoTemplate
from quant.errors import TemplateBudgetError, TemplateError

TEMPLATES = Path(__file__).parent / "data" / "templates"
USER = [{"role": "user", "content": "hi"}]
LIMIT_S = 5.0  # the budget is 1 s of wall time; generous for a loaded 2-core machine

BOMBS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "nested loops using loop": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{{ loop.last }}{% endfor %}{% endfor %}",
    "dict loop inside range": "{% for i in range(100000) %}{% for k in {'a': 1}.items() %}"
    "{% for z in range(100000) %}{% endfor %}{% endfor %}{% endfor %}",
    "recursive loop": "{% for x in range(100000) recursive %}{% if loop.depth0 == 0 %}"
    "{{ loop(range(100000)) }}{% endif %}{% endfor %}",
    "macro tree": "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}"
    "{% endmacro %}{{ f(0) }}",
    "ljust": "{{ 'a'.ljust(1000000000) }}",
    "center method": "{{ 'a'.center(1000000000) }}",
    "center filter": "{{ 'a' | center(1000000000) }}",
    "percent": "{{ '%1000000000s' % 'a' }}",
    "percent filter": "{{ '%1000000000s' | format('a') }}",
    "format width": "{{ '{:>1000000000}'.format('a') }}",
    "format precision": "{{ '{:.100000000f}'.format(1.5) }}",
    "format reuse": "{% set b = 'x' * 4000000 %}{{ '{0}{0}{0}{0}{0}{0}{0}{0}{0}'.format(b) }}",
    "tilde doubling": "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "block set doubling": "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
    "{% set t %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = t %}{% endfor %}",
    "join doubling": "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
    "{% set ns.s = [ns.s, ns.s] | join %}{% endfor %}",
    "str.join doubling": "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
    "{% set ns.s = ''.join([ns.s, ns.s]) %}{% endfor %}",
    "repeat": "{{ 'a' * 1000000000 }}",
    "replace method": "{{ ('a' * 1000000).replace('a', 'b' * 50) }}",
    "replace empty": "{% set s = 'a' * 1000000 %}{{ s.replace('', s) }}",
    "replace filter": "{{ ('a' * 1000000) | replace('a', 'b' * 50) }}",
    "translate": "{{ ('a' * 1000000).translate({97: 'x' * 1000}) }}",
    "expandtabs": "{{ ('\\t' * 1000000).expandtabs(1000) }}",
    "indent": "{{ ('\\n' * 1000000) | indent(1000) }}",
    "wordwrap": "{{ ('a' * 100000) | wordwrap(1, true, 'x' * 1000) }}",
    "striptags": "{{ ('<a>' * 300000) | striptags }}",
    "batch fill": "{{ [1] | batch(1000000000, 0) | list }}",
    "slice": "{{ [1] | slice(1000000000) | list }}",
    "lipsum": "{{ lipsum(200000) }}",
    "print shared refs": "{% set b = 'x' * 4000000 %}{% set l = [b] * 100000 %}{{ l }}",
    "nested literal refs": "{% set b = 'x' * 4000000 %}{% set l = [b, b, b, b, b, b, b, b] %}"
    "{% set l = [l, l, l, l, l, l, l, l] %}{{ l | string }}",
    "concat a list": "{% set b = 'x' * 4000000 %}{% set l = [b, b, b, b] %}{{ l ~ '' }}",
    "upper of a list": "{% set b = 'x' * 4000000 %}{{ ([b] * 8) | upper }}",
    "percent refs": "{% set b = 'x' * 4000000 %}{{ '%s%s%s%s%s%s%s%s' % (b, b, b, b, b, b, b, b) }}",
    "output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "tojson indent": "{{ range(100000) | list | tojson(indent=100000) }}",
    "int squaring": "{% set ns = namespace(x=3) %}{% for i in range(40) %}"
    "{% set ns.x = ns.x * ns.x %}{% endfor %}",
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_hostile_templates_fail_fast_within_memory(name: str) -> None:
    start, before = time.perf_counter(), _peak_mb()
    with pytest.raises(TemplateError):
        ChatTemplate(BOMBS[name], check=False).render(USER)
    assert time.perf_counter() - start < LIMIT_S
    assert _peak_mb() - before < 200


@pytest.mark.parametrize("name", ["nested loops", "ljust", "tilde doubling", "lipsum"])
def test_budget_is_named_and_checked_at_load(name: str) -> None:
    with pytest.raises(TemplateBudgetError, match="budget"):
        ChatTemplate(BOMBS[name])  # the load-time sample render refuses the template


def test_a_template_that_only_refuses_the_sample_still_loads() -> None:
    template = ChatTemplate(
        "{% if messages[0].role == 'system' %}{{ raise_exception('no') }}"
        "{% endif %}{{ messages[0].content }}"
    )
    assert template.render(USER) == "hi"


def test_limits_grow_with_the_input() -> None:
    """A long conversation is not refused: the size budget grows with the input."""
    template = ChatTemplate("{% for m in messages %}{{ m.content ~ '\\n' }}{% endfor %}")
    long = [{"role": "user", "content": "y" * 3_000_000}] * 3
    assert len(template.render(long)) == 9_000_003


def test_concurrent_renders_keep_their_own_budget() -> None:
    from concurrent.futures import ThreadPoolExecutor

    good = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    bad = ChatTemplate(BOMBS["nested loops"], check=False)

    def run(template: ChatTemplate) -> str:
        try:
            return template.render(USER)
        except TemplateBudgetError:
            return "over"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, [bad, good, bad, good]))
    assert results == ["over", "hi", "over", "hi"]


REAL = sorted(TEMPLATES.glob("*.jinja"))
CONVERSATION = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.mark.parametrize("path", REAL, ids=[p.stem for p in REAL])
def test_real_templates_render_within_budget(path: Path) -> None:
    assert len(REAL) >= 10
    template = ChatTemplate(path.read_text(), bos_token="<s>", eos_token="</s>")
    start = time.perf_counter()
    text = template.render(CONVERSATION, tools=TOOLS)
    assert "What is 2 + 2?" in text and time.perf_counter() - start < 0.5
    # a long conversation (200 turns, 1 MB) also renders
    long = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "z" * 5000}
        for i in range(201)
    ]
    assert "turn 200 " in template.render(long)


# ---- Go templates --------------------------------------------------------------------


def test_go_range_of_millions_is_refused_without_building_a_list() -> None:
    start, before = time.perf_counter(), _peak_mb()
    with pytest.raises(TemplateBudgetError):
        GoTemplate("{{ range 5000000 }}x{{ end }}{{ .Prompt }}")
    assert time.perf_counter() - start < LIMIT_S and _peak_mb() - before < 100


@pytest.mark.parametrize(
    "source",
    [
        '{{ printf (printf (printf (printf "%v%v%v%v%v%v%v%v" .Prompt .Prompt .Prompt .Prompt '
        ".Prompt .Prompt .Prompt .Prompt) 1) 2) 3 }}",
        "{{ range 1000 }}{{ range 1000 }}{{ range 1000 }}{{ end }}{{ end }}{{ end }}",
    ],
)
def test_go_template_bombs_fail_fast(source: str) -> None:
    start = time.perf_counter()
    with pytest.raises(TemplateError):  # at load (the sample render) or at this render
        GoTemplate(source).render([{"role": "user", "content": "y" * 4_000_000}])
    assert time.perf_counter() - start < 2 * LIMIT_S


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('{{ "\\UFFFFFFFF" }}', "Unicode"),
        ('{{ "\\uD800" }}', "Unicode"),
        ('{{ "\\9" }}', "escape"),
        ('{{ "\\x4" }}', "hex digits"),
        ('{{ "\\400" }}', "octal"),
        ("{{ " + "9" * 4000 + " }}", "out of range"),
        ("{{ 18446744073709551616 }}", "out of range"),
        ("{{ 1e99999 }}", "out of range"),
    ],
)
def test_go_literals_go_refuses_are_typed_errors(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        translate(source)


def test_go_literals_still_work() -> None:
    out = GoTemplate('{{ "\\377\\u00e9\\U0001F600\\x41\\n" }}{{ 0x1F }} {{ 2.5 }}{{ .Prompt }}')
    assert out.render(USER) == "ÿé😀A\n31 2.5hi"


# ---- fuzzing -------------------------------------------------------------------------

_GO_PIECES = st.sampled_from(
    [
        "{{", "}}", "{{-", "-}}", " ", ".", ".Prompt", ".Messages", ".System", "$", "$x", ":=",
        "=", "range", "if", "else", "end", "with", "len", "index", "printf", "print", "slice",
        "eq", "and", "or", "not", "json", "(", ")", "|", ",", '"', '"\\', "\\U", "\\x", "\\9",
        "`", "1", "99999999999999999999999", "0x", "1e999", "-", "/*", "*/", "break",
        "continue", "define", "nil", "true", "x", "\n", "%v",
    ]
)  # fmt: skip


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_GO_PIECES, max_size=30).map("".join))
def test_fuzz_go_translator_gives_jinja_or_template_error(source: str) -> None:
    try:
        jinja = translate(source).jinja
    except TemplateError:
        return
    assert isinstance(jinja, str)
    start = time.perf_counter()
    try:
        GoTemplate(source).render([*USER, {"role": "assistant", "content": "ok"}, *USER])
    except TemplateError:
        pass
    assert time.perf_counter() - start < LIMIT_S


_JINJA_PIECES = st.sampled_from(
    [
        "{%", "%}", "{{", "}}", " for x in ", " range(", "100000", ")", " endfor ", " if ",
        " endif ", " set ns = namespace(s='ab') ", " set ns.s = ", "ns.s", " ~ ", " * ", " + ",
        " % ", "'%99999999s'", "'{:>99999999}'", ".format(", ".ljust(", ".center(", "|join",
        "|center(", "|replace('a', ns.s)", "|indent(", "|batch(", "|list", "|string",
        "|tojson", "lipsum(", "messages", "x", "[", "]", ",", "loop.index", "loop(", " recursive ",
        " macro m() ", " endmacro ", "m()", "caller()", "'a'", "9999999", "2", "(", "**",
    ]
)  # fmt: skip


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_JINJA_PIECES, max_size=40).map("".join))
def test_fuzz_sandbox_renders_or_refuses_within_the_time_bound(source: str) -> None:
    start = time.perf_counter()
    try:
        ChatTemplate(source, check=False).render(USER)
    except TemplateError:
        pass
    assert time.perf_counter() - start < LIMIT_S
