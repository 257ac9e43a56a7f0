"""The model store and its commands, in a temporary TANDEM_HOME: create (from a GGUF path,
from a stored model, from a pullable name; --quantize), list, show, cp, rm; the manifest
round trip through `show --modelfile`; and the issue's pirate Modelfile end to end on the
real SmolLM2 through `tandem run`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_model import KVCache, forward

from loaders.gguf_file import GGUFFile
from loaders.pull import KNOWN
from modelfiles.builder import create_model
from modelfiles.names import ModelName
from modelfiles.parser import parse_modelfile, read_modelfile
from modelfiles.store import Store
from quant.errors import (
    InvalidParameterError,
    ModelfileError,
    ModelNotFoundError,
    UnsupportedError,
)
from runtime.cli.main import main
from runtime.loaded_model import LoadedModel

# a tiny llama with a byte-level BPE vocabulary: enough for LoadedModel, chat templates, run
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + [chr(c) for c in range(0x21, 0x7F)] + ["\u0120", "\u010a", "ab"]
E, H, FF, LAYERS = 64, 4, 96, 1


def write_tiny_llama(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    v = len(TOKENS)

    def rnd(*shape):
        return (g.standard_normal(shape) * 0.2).astype(np.float32)

    w = {
        "token_embd.weight": rnd(v, E),
        "output_norm.weight": 1 + rnd(E),
        "output.weight": rnd(v, E),
    }
    for name, shape in (
        ("attn_q", (E, E)),
        ("attn_k", (E, E)),
        ("attn_v", (E, E)),
        ("attn_output", (E, E)),
        ("ffn_gate", (FF, E)),
        ("ffn_up", (FF, E)),
        ("ffn_down", (E, FF)),
    ):
        w[f"blk.0.{name}.weight"] = rnd(*shape)
    w["blk.0.attn_norm.weight"] = 1 + rnd(E)
    w["blk.0.ffn_norm.weight"] = 1 + rnd(E)
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (writer.add_block_count, LAYERS),
        (writer.add_context_length, 256),
        (writer.add_embedding_length, E),
        (writer.add_feed_forward_length, FF),
        (writer.add_head_count, H),
        (writer.add_head_count_kv, H),
        (writer.add_rope_freq_base, 10000.0),
        (writer.add_layer_norm_rms_eps, 1e-6),
        (writer.add_tokenizer_model, "gpt2"),
        (writer.add_tokenizer_pre, "gpt-2"),
        (writer.add_token_list, TOKENS),
        (writer.add_token_merges, ["a b"]),
        (writer.add_token_types, [3, 3, 3] + [1] * (len(TOKENS) - 3)),
        (writer.add_eos_token_id, 2),
        (writer.add_add_bos_token, False),
    ):
        add(value)
    for name, array in w.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return w


def fresh_home(path: Path, monkeypatch) -> Path:
    """An empty TANDEM_HOME at `path` that shares the session's build cache (the native
    kernel is built under TANDEM_HOME/build: a fresh one would cost a minute's rebuild)."""
    build = Path(os.environ["TANDEM_HOME"]) / "build"
    build.mkdir(parents=True, exist_ok=True)
    path.mkdir(parents=True)
    (path / "build").symlink_to(build, target_is_directory=True)
    monkeypatch.setenv("TANDEM_HOME", str(path))
    return path


def create(name: str, text: str, workdir: Path, quantize: str | None = None):
    mf = workdir / f"{name.replace(':', '_')}.Modelfile"
    mf.write_text(text)
    return create_model(Store(), ModelName.parse(name), read_modelfile(mf), workdir, quantize)


def blobs(home: Path) -> set[str]:
    return {p.name for p in (home / "models" / "blobs").iterdir()}


# ---- create, list, show, cp, rm ---------------------------------------------------------


def test_create_list_show_cp_rm_through_the_cli(home, workdir, capsys):
    (workdir / "Modelfile").write_text(
        "FROM ./tiny.gguf\nPARAMETER temperature 0.3\nPARAMETER stop <|im_end|>\n"
        "SYSTEM You are terse.\nLICENSE MIT\nMESSAGE user hi\nMESSAGE assistant yo\n"
    )
    assert main(["create", "tiny", "-f", str(workdir / "Modelfile")]) == 0
    out = capsys.readouterr().out
    assert "copying file" in out and "writing manifest" in out and out.endswith("success\n")

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["NAME", "ID", "SIZE", "MODIFIED"]
    name, ident, size, modified = re.split(r"\s{2,}", lines[1])
    assert name == "tiny:latest" and re.fullmatch(r"[0-9a-f]{12}", ident)
    assert size.endswith("KB") and "ago" in modified

    assert main(["show", "tiny", "--parameters"]) == 0
    assert capsys.readouterr().out == (
        'temperature                    0.3\nstop                           "<|im_end|>"\n'
    )
    assert main(["show", "tiny", "--system"]) == 0
    assert capsys.readouterr().out == "You are terse.\n"
    assert main(["show", "tiny", "--license"]) == 0
    assert capsys.readouterr().out == "MIT\n"
    assert main(["show", "tiny", "--template"]) == 0  # none set: the architecture's ChatML
    assert "<|im_start|>" in capsys.readouterr().out
    assert main(["show", "tiny"]) == 0
    summary = capsys.readouterr().out
    assert "architecture        llama" in summary and "You are terse." in summary

    assert main(["cp", "tiny", "tiny2:v1"]) == 0
    assert capsys.readouterr().out == "copied 'tiny:latest' to 'tiny2:v1'\n"
    assert Store().get(ModelName("tiny2", "v1")) == Store().get(ModelName("tiny"))
    before = blobs(home)
    assert main(["rm", "tiny"]) == 0
    assert capsys.readouterr().out == "deleted 'tiny:latest'\n"
    assert blobs(home) == before  # tiny2:v1 still uses the blob
    assert main(["rm", "tiny2:v1"]) == 0
    assert capsys.readouterr().out == "deleted 'tiny2:v1'\n"
    assert blobs(home) == set()  # the last user is gone: so is the blob
    assert main(["list"]) == 0
    assert capsys.readouterr().out.strip().split() == ["NAME", "ID", "SIZE", "MODIFIED"]


def test_cli_errors_are_reported_not_raised(home, workdir, capsys):
    (workdir / "Modelfile").write_text("FROM ./tiny.gguf\nPARAMETER temprature 1\n")
    assert main(["create", "x", "-f", str(workdir / "Modelfile")]) == 1
    assert "Modelfile line 2: unknown parameter 'temprature'" in capsys.readouterr().err
    assert main(["create", "x", "-f", str(workdir / "missing")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["rm", "nothing-here"]) == 1
    assert "not in the store" in capsys.readouterr().err
    assert main(["cp", "nothing-here", "y"]) == 1
    assert main(["show", "bad name!"]) == 1
    assert "not valid" in capsys.readouterr().err


def test_from_errors_carry_the_line(home, workdir):
    with pytest.raises(ModelfileError) as info:
        create("x", "# a comment\nFROM ./missing.gguf\n", workdir)
    assert info.value.line == 2 and "no such file" in str(info.value)
    with pytest.raises(ModelfileError) as info:
        create("x", "FROM no-such-model\n", workdir)
    assert info.value.line == 1
    for name in KNOWN:
        assert name in str(info.value)
    (workdir / "notes.gguf").write_text("not a gguf")
    with pytest.raises(Exception, match="GGUF|gguf"):
        create("x", "FROM notes.gguf\n", workdir)
    with pytest.raises(ModelfileError, match="not a LoRA adapter"):
        create("x", "FROM tiny.gguf\nADAPTER tiny.gguf\n", workdir)


def test_names():
    assert ModelName.parse("Pirate") == ModelName("pirate", "latest")
    assert str(ModelName.parse("a.b-c_d:Q4_K_M")) == "a.b-c_d:q4_k_m"
    assert ModelName.parse("x:") == ModelName("x", "latest")
    for bad in ("", "a b", "../x", ":tag", "-x", "x:t/a", "x" * 81):
        with pytest.raises(InvalidParameterError):
            ModelName.parse(bad)


# ---- inheritance (ollama's semantics) ---------------------------------------------------


def test_from_a_stored_model_inherits_and_overrides(home, workdir):
    base = create(
        "base",
        "FROM tiny.gguf\nPARAMETER temperature 0.5\nPARAMETER top_k 7\n"
        "PARAMETER stop a\nSYSTEM base system\nTEMPLATE {{ .Prompt }}\nLICENSE L0\n"
        "MESSAGE user u0\n",
        workdir,
    )
    child = create(
        "child", "FROM base\nPARAMETER temperature 0.1\nPARAMETER stop b\nLICENSE L1\n", workdir
    )
    assert child.model == base.model
    assert child.parameters == {"temperature": 0.1, "top_k": 7, "stop": ["b"]}
    assert (child.system, child.template) == ("base system", "{{ .Prompt }}")
    assert child.license == ["L0", "L1"] and child.messages == [{"role": "user", "content": "u0"}]
    assert child.parent == "base:latest"
    grandchild = create("grandchild", 'FROM child\nSYSTEM ""\nMESSAGE user u1\n', workdir)
    assert grandchild.system == "" and grandchild.messages == [{"role": "user", "content": "u1"}]


# ---- show --modelfile round trip ------------------------------------------------------------

_WORDS = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=20
).filter(lambda s: '"' not in s)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    system=st.none() | _WORDS,
    temperature=st.floats(0, 2),
    stops=st.lists(_WORDS.filter(lambda s: s.strip() != ""), max_size=2),
    messages=st.lists(_WORDS, max_size=2),
)
def test_property_show_modelfile_parses_back_to_the_same_manifest(
    home, workdir, capsys, system, temperature, stops, messages
):
    lines = ["FROM tiny.gguf", f"PARAMETER temperature {temperature!r}"]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f'SYSTEM """{system}"""'] if system is not None else []
    lines += [f'MESSAGE user """{m}"""' for m in messages]
    first = create("orig", "\n".join(lines) + "\n", workdir)
    assert main(["show", "orig", "--modelfile"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith('# Modelfile generated by "tandem show"')
    (workdir / "Shown").write_text(shown)
    second = create_model(Store(), ModelName("again"), parse_modelfile(shown), workdir)
    assert second == first


# ---- quantize on create -----------------------------------------------------------------------


def test_create_quantize_q8_0_from_f32_and_load(home, workdir, capsys):
    (workdir / "Modelfile").write_text("FROM ./tiny.gguf\n")
    assert main(["create", "tiny-q8", "-f", str(workdir / "Modelfile"), "--quantize", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "quantized 9 of 12 tensors from F32 to Q8_0" in out and "quantizing blk.0.ffn_up" in out
    manifest = Store().get(ModelName("tiny-q8"))
    assert manifest.quantization == "Q8_0"
    quantized = GGUFFile(Store().blob_path(manifest.model))
    types = {n: gguf.GGMLQuantizationType(t.ggml_type).name for n, t in quantized.tensors.items()}
    assert types["token_embd.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert quantized.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert quantized.metadata["tokenizer.ggml.tokens"] == TOKENS
    reference = GGUFFile(workdir / "tiny.gguf").metadata
    assert {k: v for k, v in quantized.metadata.items() if k != "general.file_type"} == reference

    # it loads and runs; its logits stay within Q8_0's error of the F32 model's
    q8, f32 = LoadedModel.load("tiny-q8"), LoadedModel.load(workdir / "tiny.gguf")
    tokens = torch.tensor(q8.tokenizer.encode("abc def", add_special=False))
    with torch.inference_mode():
        a = forward(q8.model, tokens, 0, KVCache(q8.config, 32, dtype=torch.float32), True)
        b = forward(f32.model, tokens, 0, KVCache(f32.config, 32, dtype=torch.float32), True)
    # Q8_0 keeps ~2.5 significant digits per weight (and the native kernel also quantizes
    # activations to int8): a relative error of a few 1e-3 on logits of size ~1
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert not torch.equal(a, b)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1"])
def test_create_quantize_4_bit(home, workdir, qtype):
    manifest = create(f"tiny-{qtype}", "FROM tiny.gguf\n", workdir, quantize=qtype)
    quantized = GGUFFile(Store().blob_path(manifest.model))
    assert (
        quantized.tensors["blk.0.attn_q.weight"].ggml_type
        == gguf.GGMLQuantizationType[qtype.upper()]
    )
    LoadedModel.load(f"tiny-{qtype}")


def test_quantize_errors(home, workdir):
    with pytest.raises(UnsupportedError, match="q4_0, q4_1, q8_0"):
        create("x", "FROM tiny.gguf\n", workdir, quantize="q5_k")
    create("q8", "FROM tiny.gguf\n", workdir, quantize="q8_0")
    with pytest.raises(UnsupportedError, match="unquantized"):
        create("again", "FROM q8\n", workdir, quantize="q4_0")


# ---- the model at run time: precedence and the conversation ---------------------------------


def test_loaded_model_uses_template_system_messages_and_parameters(home, workdir):
    create(
        "tpl",
        'FROM tiny.gguf\nTEMPLATE """{{ range .Messages }}[{{ .Role }}]{{ .Content }}'
        '{{ end }}[assistant]"""\nSYSTEM sys\nMESSAGE user u0\nMESSAGE assistant a0\n'
        "PARAMETER temperature 0.25\nPARAMETER num_predict 3\nPARAMETER num_ctx 64\n",
        workdir,
    )
    lm = LoadedModel.load("tpl")
    assert lm.parameters["num_ctx"] == 64 and lm.system == "sys"
    text = lm.template.render(lm.conversation([{"role": "user", "content": "q"}]))
    assert text == "[system]sys[user]u0[assistant]a0[user]q[assistant]"
    ids = lm.chat_prompt_ids([{"role": "user", "content": "q"}])
    assert lm.tokenizer.decode(ids) == text
    # a caller's own system message replaces SYSTEM
    own = lm.conversation([{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}])
    assert [m["content"] for m in own] == ["mine", "u0", "a0", "q"]
    # PARAMETERs are defaults under a request's own options
    from runtime.cli.main import RUN_DEFAULTS
    from runtime.sampling_params import SamplingParams

    params = lm.sampling_defaults(RUN_DEFAULTS)
    assert (params.temperature, params.max_tokens, params.top_k) == (0.25, 3, 40)
    assert SamplingParams.from_options({"temperature": 0.9}, params).temperature == 0.9
    # without a TEMPLATE: the GGUF's (none here), then the architecture's ChatML
    create("plain", "FROM tiny.gguf\n", workdir)
    assert (
        LoadedModel.load("plain").template.render([{"role": "user", "content": "q"}])
        == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )


def test_unknown_names_list_stored_and_pullable(home, workdir):
    create("mine", "FROM tiny.gguf\n", workdir)
    with pytest.raises(ModelNotFoundError) as info:
        LoadedModel.load("nope")
    assert "mine:latest" in str(info.value) and all(n in str(info.value) for n in KNOWN)
    with pytest.raises(ModelNotFoundError):
        LoadedModel.load("mine:other-tag")


# ---- the pirate Modelfile, end to end on SmolLM2 --------------------------------------

PIRATE = '''FROM smollm2
PARAMETER temperature 0
PARAMETER num_ctx 4096
PARAMETER stop "<|im_end|>"
SYSTEM """You are a pirate. Answer in one sentence."""
MESSAGE user Hello
MESSAGE assistant Arr, ahoy!
'''


def test_pirate_end_to_end(home, tmp_path, smollm2_path, capsys):
    # the pulled SmolLM2 stands in the fresh store's blob directory (no second download)
    blob_dir = home / "models" / "blobs"
    blob_dir.mkdir(parents=True)
    os.symlink(smollm2_path, blob_dir / smollm2_path.name)
    (tmp_path / "Modelfile").write_text(PIRATE)
    assert main(["create", "pirate", "-f", str(tmp_path / "Modelfile")]) == 0
    assert "using base model smollm2:latest" in capsys.readouterr().out
    assert {n for n, _ in Store().list()} == {ModelName("pirate"), ModelName("smollm2")}

    question = "What is the capital of France?"
    # a real `tandem run` in its own process (Repl binds sys.stdout when first imported, so
    # capsys cannot see it once another test imported it); --num-ctx 512 overrides the
    # Modelfile's 4096 to keep the test quick
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.cli.main",
            "run",
            "pirate",
            question,
            "--num-predict",
            "24",
            "--num-ctx",
            "512",
        ],
        cwd=REPO,
        input="",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TANDEM_HOME": str(home)},
    )
    assert run.returncode == 0, run.stderr
    answer = run.stdout
    assert answer.strip() and "<|im_end|>" not in answer and "<|im_start|>" not in answer

    lm = LoadedModel.load("pirate")
    ids = lm.chat_prompt_ids([{"role": "user", "content": question}])
    expected = (
        "<|im_start|>system\nYou are a pirate. Answer in one sentence.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nArr, ahoy!<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids == lm.tokenizer.encode(expected, add_special=False, parse_special=True)
    # temperature 0 from the Modelfile: the same answer again, through the offline API
    from runtime.cli.main import RUN_DEFAULTS
    from runtime.llm import LLM
    from runtime.sampling_params import SamplingParams

    llm = LLM("pirate", num_ctx=512)
    params = SamplingParams.from_options(
        {"num_predict": 24}, llm.lm.sampling_defaults(RUN_DEFAULTS)
    )
    assert params.temperature == 0 and params.stop == ["<|im_end|>"]  # replaces smollm2's
    again = llm.chat([{"role": "user", "content": question}], params).outputs[0].text
    assert again + "\n" == answer
    # and through the OpenAI API of a real server: the same answer for model "pirate"
    import openai
    from test_server import Server

    from runtime.server.app import create_app
    from runtime.server.models import RegistryOptions

    server = Server(create_app(RegistryOptions(num_ctx=512)))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="pirate", messages=[{"role": "user", "content": question}], max_tokens=24
        )
        assert reply.choices[0].message.content == again
        assert reply.usage.prompt_tokens == len(ids)
    finally:
        server.stop()
    manifest = json.loads(Store().manifest_path(ModelName("pirate")).read_text())
    assert manifest["model"]["digest"] == "sha256:" + smollm2_path.name.removeprefix("sha256-")


def test_plan_takes_the_modelfile_placement_settings(home, workdir, capsys):
    create(
        "planned",
        "FROM tiny.gguf\nPARAMETER num_ctx 64\nPARAMETER num_gpu 1\n"
        'PARAMETER gpu_memory 200MB\nPARAMETER pin "blk\\.0\\.ffn_.*=cpu"\n',
        workdir,
    )
    capsys.readouterr()
    assert main(["plan", "planned", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_gpu_layers"] == 1 and out["request"]["num_ctx"] == 64
    assert out["budgets"]["gpu"] == 200 * 10**6
    assert out["request"]["pins"] == ["blk\\.0\\.ffn_.*"]
    # flags override the Modelfile
    assert main(["plan", "planned", "--json", "--num-gpu", "0", "--num-ctx", "128"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_gpu_layers"] == 0 and out["request"]["num_ctx"] == 128
