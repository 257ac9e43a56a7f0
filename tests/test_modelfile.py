"""The Modelfile parser: ollama's documented examples and its parser's test cases (facts:
inputs and the values ollama reads from them), every error with its line, typed parameters,
and the property that writing a Modelfile back and parsing it gives the same Modelfile."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfiles.modelfile import Modelfile
from modelfiles.parameters import PARAMETERS, parse_value, pin_rule
from modelfiles.parser import decode, parse_modelfile
from modelfiles.values import quote
from quant.errors import ModelfileError

PIRATE = '''FROM smollm2
PARAMETER temperature 0.3
PARAMETER num_ctx 4096
PARAMETER stop "<|im_end|>"
SYSTEM """You are a pirate. Answer in one sentence."""
MESSAGE user Hello
MESSAGE assistant Arr, ahoy!
'''

# ollama's docs/modelfile.md "mario" example
MARIO = """FROM llama3.2
# sets the temperature to 1 [higher is more creative, lower is more coherent]
PARAMETER temperature 1
# sets the context window size to 4096, this controls how many tokens the LLM can use as context to generate the next token
PARAMETER num_ctx 4096

# sets a custom system message to specify the behavior of the chat assistant
SYSTEM You are Mario from super mario bros, acting as an assistant.
"""


def test_issue_pirate_example():
    mf = parse_modelfile(PIRATE)
    assert mf.from_ == "smollm2"
    assert mf.parameters == {"temperature": 0.3, "num_ctx": 4096, "stop": ["<|im_end|>"]}
    assert mf.system == "You are a pirate. Answer in one sentence."
    assert mf.messages == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr, ahoy!"},
    ]
    assert mf.template is None and mf.adapters == [] and mf.license == []


def test_docs_mario_example():
    mf = parse_modelfile(MARIO)
    assert mf.from_ == "llama3.2"
    assert mf.parameters == {"temperature": 1.0, "num_ctx": 4096}
    assert isinstance(mf.parameters["temperature"], float)
    assert isinstance(mf.parameters["num_ctx"], int)
    assert mf.system == "You are Mario from super mario bros, acting as an assistant."


def test_docs_template_adapter_license_example():
    text = (
        '''FROM model1
ADAPTER adapter1
LICENSE MIT
PARAMETER stop "### User:"
TEMPLATE """{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>"""'''
        + "    \n"
    )  # blanks after the closing quotes
    mf = parse_modelfile(text)
    assert mf.adapters == ["adapter1"] and mf.license == ["MIT"]
    assert mf.parameters == {"stop": ["### User:"]}
    assert mf.template == (
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
        "{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}"
        "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{{ .Response }}<|eot_id|>"
    )


@pytest.mark.parametrize(
    "line, value",
    [
        ('FROM "FOO  BAR  "', "FOO  BAR  "),
        ("FROM     FOOO BAR    ", "FOOO BAR"),
        ("FROM /what/is/the path ", "/what/is/the path"),
        ("FROM llama3:7b-instruct-q4_K_M", "llama3:7b-instruct-q4_K_M"),
        ("from ~/models/x.gguf", "~/models/x.gguf"),
        ("FrOm\tfoo", "foo"),
    ],
)
def test_from_values(line, value):
    assert parse_modelfile(line).from_ == value


@pytest.mark.parametrize(
    "text, value",
    [
        ('"""\nThis is a\nmultiline system.\n"""', "\nThis is a\nmultiline system.\n"),
        ('"""\nThis is a\nmultiline system."""', "\nThis is a\nmultiline system."),
        ('"""This is a\nmultiline system."""', "This is a\nmultiline system."),
        ('"""This is a multiline system."""', "This is a multiline system."),
        (
            '"""\nThis is a multiline system with "quotes".\n"""',
            '\nThis is a multiline system with "quotes".\n',
        ),
        ('""""""', ""),
        ('""', ""),
        ('"\'"', "'"),
        ('"""\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""', "''\"'\"\"'\"\"'\"'''''\"\"'\"\"'"),
        ('"two\nlines"', "two\nlines"),
        ("   bare value with   inner  spaces   ", "bare value with   inner  spaces"),
        ("# not a comment here", "# not a comment here"),
    ],
)
def test_quoted_values(text, value):
    assert parse_modelfile(f"FROM foo\nSYSTEM {text}\n").system == value


@pytest.mark.parametrize(
    "line, name, value",
    [
        ("num_ctx 1", "num_ctx", 1),
        ("num_batch 1", "num_batch", 1),
        ("num_gpu 1", "num_gpu", 1),
        ("use_mmap true", "use_mmap", True),
        ("use_mmap T", "use_mmap", True),
        ("num_thread 1", "num_thread", 1),
        ("num_keep 4", "num_keep", 4),
        ("seed 1", "seed", 1),
        ("num_predict -1", "num_predict", -1),
        ("top_k 1", "top_k", 1),
        ("top_p 1.0", "top_p", 1.0),
        ("min_p 0.05", "min_p", 0.05),
        ("repeat_last_n 1", "repeat_last_n", 1),
        ("temperature 1.0", "temperature", 1.0),
        ("repeat_penalty 1.0", "repeat_penalty", 1.0),
        ("presence_penalty 1.0", "presence_penalty", 1.0),
        ("frequency_penalty 1.0", "frequency_penalty", 1.0),
        ("temperature 7e-1", "temperature", 0.7),
        ("stop ### User:", "stop", ["### User:"]),
        ("stop ### User: ", "stop", ["### User:"]),
        ('stop "### User:"', "stop", ["### User:"]),
        ('stop "### User: "', "stop", ["### User: "]),
        ('stop """### User:"""', "stop", ["### User:"]),
        ('stop """### User:\n"""', "stop", ["### User:\n"]),
        ("stop <|eot_id|>", "stop", ["<|eot_id|>"]),
        ("stop </s>", "stop", ["</s>"]),
        ("gpu_memory 6GiB", "gpu_memory", 6 << 30),
        ("gpu_memory 512mb", "gpu_memory", 512 * 10**6),
        ("gpu_memory 1000", "gpu_memory", 1000),
        (r'pin "blk\.1[0-9]\.ffn_.*=CPU"', "pin", [r"blk\.1[0-9]\.ffn_.*=cpu"]),
        ("pin token_embd=cuda:0", "pin", ["token_embd=cuda:0"]),
        ("NUM_CTX 8", "num_ctx", 8),
    ],
)
def test_parameters_typed(line, name, value):
    assert parse_modelfile(f"FROM foo\nPARAMETER {line}\n").parameters == {name: value}


def test_stop_and_pin_accumulate_others_take_the_last_value():
    mf = parse_modelfile(
        "FROM x\nPARAMETER stop a\nPARAMETER temperature 1\nPARAMETER stop b\n"
        "PARAMETER temperature 0.5\nPARAMETER pin a=cpu\nPARAMETER pin b=gpu\n"
        "SYSTEM one\nSYSTEM two\nLICENSE l1\nLICENSE l2\n"
    )
    assert mf.parameters == {"stop": ["a", "b"], "temperature": 0.5, "pin": ["a=cpu", "b=gpu"]}
    assert mf.system == "two" and mf.license == ["l1", "l2"]
    pattern, device = pin_rule(mf.parameters["pin"][0])
    assert pattern.search("a_tensor") and device == "cpu"


def test_comments_blank_lines_and_case_insensitive_keywords():
    mf = parse_modelfile(
        "\n# comment\n   # indented comment\nfrom foo\n\n"
        "Parameter TOP_K 3\nmessage User hi\nMESSAGE SYSTEM be brief\n"
    )
    assert mf.from_ == "foo" and mf.parameters == {"top_k": 3}
    assert mf.messages == [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "be brief"},
    ]


def test_line_endings_and_encodings():
    text = "FROM bob\r\nPARAMETER num_ctx 4096\rSYSTEM You are a utf16 file.\r\n"
    for raw in (text.encode("utf-16"), text.encode("utf-8-sig"), text.encode()):
        mf = parse_modelfile(decode(raw))
        assert (mf.from_, mf.parameters, mf.system) == (
            "bob",
            {"num_ctx": 4096},
            "You are a utf16 file.",
        )
    with pytest.raises(ModelfileError, match="not UTF-8"):
        decode(b"FROM \xff\xfe\xfd"[1:])


def test_unsupported_ollama_parameters_only_at_their_off_value():
    mf = parse_modelfile("FROM x\nPARAMETER mirostat 0\nREQUIRES 0.6.0\n")
    assert mf.parameters == {"mirostat": 0}  # what tandem does anyway
    assert any("REQUIRES" in w and "line 3" in w for w in mf.warnings)
    with pytest.raises(ModelfileError, match="mirostat 2 is not supported") as err:
        parse_modelfile("FROM x\nPARAMETER mirostat 2\n")
    assert err.value.line == 2


# ---- errors, each with its line -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("FROM foo\nBADCOMMAND param1 value1\n", 2, ["unknown instruction", "BADCOMMAND", "FROM"]),
        ("FROM foo\n\nPARAMETER param1 value1\n", 3, ["unknown parameter", "param1", "num_ctx"]),
        ("FROM foo\nPARAMETER num_ctx big\n", 2, ["num_ctx", "integer", "big"]),
        ("FROM foo\nPARAMETER temperature hot\n", 2, ["temperature", "number"]),
        ("FROM foo\nPARAMETER temperature -1\n", 2, ["temperature", ">= 0"]),
        ("FROM foo\nPARAMETER top_p 2\n", 2, ["top_p", "0 to 1"]),
        ("FROM foo\nPARAMETER num_ctx 0\n", 2, ["num_ctx", "at least 1"]),
        ("FROM foo\nPARAMETER use_mmap maybe\n", 2, ["use_mmap", "true or false"]),
        ("FROM foo\nPARAMETER gpu_memory lots\n", 2, ["gpu_memory", "6GiB"]),
        ("FROM foo\nPARAMETER pin blk.*\n", 2, ["pin", "PATTERN=DEVICE"]),
        ("FROM foo\nPARAMETER pin (=cpu\n", 2, ["pin", "regular expression"]),
        ('FROM foo\nPARAMETER stop ""\n', 2, ["stop", "non-empty"]),
        ("FROM foo\nPARAMETER param1\n", 2, ["PARAMETER needs a value"]),
        ("FROM foo\nPARAMETER\n", 2, ["PARAMETER needs a parameter name"]),
        ("FROM foo\nMESSAGE badguy I'm a bad guy!\n", 2, ["role", "badguy", "assistant"]),
        ("FROM foo\nMESSAGE system\n", 2, ["MESSAGE needs a value"]),
        ("FROM foo\nMESSAGE system", 2, ["MESSAGE needs a value"]),
        ("FROM foo\nSYSTEM\n", 2, ["SYSTEM needs a value"]),
        ('FROM foo\nSYSTEM """This is a multiline system.""\n', 2, ['"""', "never closed"]),
        ('FROM foo\n\nSYSTEM "\nmore\n', 3, ['"', "never closed"]),
        ("FROM foo\nFROM bar\n", 2, ["second FROM", "line 1"]),
        ('FROM ""\n', 1, ["FROM needs a model name"]),
        ("FROM foo\nRENDERER x\n", 2, ["RENDERER", "does not support"]),
        ("FROM foo\nTEMPLATE {{ .Prompt\n", 2, ["TEMPLATE", "never closed"]),
        ('FROM foo\nTEMPLATE """ok\n{{ template "x" }}"""\n', 2, ["TEMPLATE line 2", "template"]),
    ],
)
def test_errors_carry_the_line(text, line, words):
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text)
    assert info.value.line == line
    message = str(info.value)
    assert message.startswith(f"Modelfile line {line}: ")
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "PARAMETER num_ctx 1\n"])
def test_missing_from(text):
    with pytest.raises(ModelfileError, match="no FROM line") as info:
        parse_modelfile(text)
    assert info.value.line is None


# ---- writing back --------------------------------------------------------------------------


def test_to_text_round_trips_ollama_cases():
    cases = [
        PIRATE,
        MARIO,
        'FROM foo\nADAPTER adapter1\nLICENSE """\nVery long and boring legal text.\n'
        'Blah blah blah.\n"Oh look, a quote!"\n"""\n\nPARAMETER top_k 5\nTEMPLATE template1\n'
        'MESSAGE system """\nYou are a store greeter. Always respond with "Hello!".\n"""\n'
        "MESSAGE user Hey there!\nMESSAGE assistant Hello, I want to parse all the things!\n",
        'FROM foo\nSYSTEM ""\n',
    ]
    for text in cases:
        mf = parse_modelfile(text)
        assert parse_modelfile(mf.to_text()) == mf


@pytest.mark.parametrize(
    "value, written",
    [
        ("plain", "plain"),
        ("", '""'),
        (" lead", '" lead"'),
        ("two\nlines", '"two\nlines"'),
        ('"starts quoted', '""starts quoted"'),
        ('say "hi"\nthen', '"""say "hi"\nthen"""'),
    ],
)
def test_quote(value, written):
    assert quote(value) == written


def test_quote_refuses_what_no_modelfile_can_hold():
    with pytest.raises(ModelfileError, match="carriage return"):
        quote("a\rb")
    with pytest.raises(ModelfileError, match="no escapes"):
        quote('ends with a quote"\nand a triple"""\nx')


# ---- the property: parse → write → parse is the identity -----------------------------------

_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=40)


def _writable(value: str) -> bool:
    try:
        quote(value)
        return True
    except ModelfileError:
        return False


_VALUE = _TEXT.filter(_writable)
_NONEMPTY = _VALUE.filter(lambda s: s.strip() != "")
_PARAM_VALUE = {
    "num_ctx": st.integers(1, 1 << 20),
    "num_predict": st.integers(-2, -1) | st.integers(1, 4096),
    "temperature": st.floats(0, 5),
    "top_k": st.integers(0, 200),
    "top_p": st.floats(0, 1),
    "min_p": st.floats(0, 1),
    "repeat_penalty": st.floats(0.01, 3),
    "presence_penalty": st.floats(-2, 2),
    "seed": st.integers(-1, 2**63),
    "stop": st.lists(_NONEMPTY, min_size=1, max_size=3),
    "use_mmap": st.just(True),  # false is refused: the file is always mapped
    "gpu_memory": st.integers(0, 1 << 40),
    "pin": st.lists(
        st.sampled_from([r"blk\.[0-9]+\.ffn_.*=cpu", "token_embd=cuda:0"]), min_size=1, max_size=2
    ),
}


@st.composite
def modelfiles(draw) -> Modelfile:
    names = draw(st.lists(st.sampled_from(sorted(_PARAM_VALUE)), unique=True, max_size=6))
    return Modelfile(
        from_=draw(_NONEMPTY),
        parameters={n: draw(_PARAM_VALUE[n]) for n in names},
        template=draw(st.none() | st.just("{{ .System }}{{ .Prompt }}")),
        system=draw(st.none() | _VALUE),
        adapters=draw(st.lists(_NONEMPTY, max_size=2)),
        license=draw(st.lists(_VALUE, max_size=2)),
        messages=draw(
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["system", "user", "assistant"]), "content": _VALUE}
                ),
                max_size=3,
            )
        ),
    )


@settings(max_examples=300, deadline=None)
@given(modelfiles())
def test_property_write_then_parse_is_identity(mf):
    assert parse_modelfile(mf.to_text("generated\nby a test")) == mf


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(list('ab "\n#') + ["\t"]), max_size=30))
def test_property_any_system_value_the_parser_reads_is_written_back(body):
    try:
        mf = parse_modelfile(f"FROM x\nSYSTEM {body}")
    except ModelfileError:
        return  # not a valid Modelfile: nothing to write back
    assert parse_modelfile(mf.to_text()).system == mf.system


def test_every_parameter_has_a_type_and_default():
    for name, spec in PARAMETERS.items():
        assert spec.kind in ("int", "float", "bool", "str", "size", "pin"), name
        if spec.default is not None:
            assert parse_value(name, str(spec.default).lower()) == spec.default
