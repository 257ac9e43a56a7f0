"""ollama-python against a real tandem server on loopback (uvicorn, the real SmolLM2): every
call a client of ollama makes — generate, chat, list, show, ps, pull, create, copy, delete,
keep_alive 0 — plus llama-server's /tokenize, /detokenize, /apply-template, OpenAI's
/v1/models/{id}, and embeddings through openai, langchain-openai and ollama, checked against
vectors llama-server computed for the same GGUF (tests/data/smollm2_embeddings.llamacpp.json).
Models this test creates get a unique name and are deleted again."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx2
import ollama
import openai
import pytest
import torch
from test_server import Server

from runtime.server.app import create_app
from runtime.server.models import RegistryOptions

MODEL = "smollm2"


@pytest.fixture(scope="module")
def server(smollm2_path):
    app = create_app(RegistryOptions(num_ctx=256, max_num_seqs=4), preload=MODEL)
    srv = Server(app)
    srv.app = app
    deadline = time.time() + 300
    while httpx2.get(f"{srv.url}/health").status_code != 200:
        assert time.time() < deadline, "the preloaded model never became ready"
        time.sleep(0.1)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


def test_generate_and_chat(client):
    out = client.generate(model=MODEL, prompt="The moon is", options={"num_predict": 4})
    assert out.done and out.response and out.eval_count == 4
    parts = list(
        client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            options={"num_predict": 3, "temperature": 0},
            stream=True,
        )
    )
    assert parts[-1].done and "".join(p.message.content for p in parts)


def test_pull_streams_status_lines_and_ends_in_success(client):
    lines = list(client.pull(MODEL, stream=True))
    statuses = [p.status for p in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    layer = next(p for p in lines if p.digest)
    assert layer.digest.startswith("sha256:b179c952") and layer.completed == layer.total > 0
    assert client.pull(MODEL).status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        client.pull("no-such-model")
    assert info.value.status_code == 404


def test_create_show_copy_delete(client):
    name = f"tandem-test-{uuid.uuid4().hex[:8]}"
    copy = f"{name}-copy"
    client.pull(MODEL)  # the base's manifest is stored: deleting ours frees no shared blob
    try:
        done = client.create(
            model=name,
            from_=MODEL,
            system="You are terse.",
            parameters={"temperature": 0.25, "stop": ["<|im_end|>", "END"], "num_ctx": 256},
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        )
        assert done.status == "success"
        shown = client.show(name)
        assert "You are terse." in shown.modelfile and "temperature" in (shown.parameters or "")
        assert "END" in (shown.parameters or "")
        names = [m.model for m in client.list().models]
        assert f"{name}:latest" in names
        client.copy(name, copy)
        assert f"{copy}:latest" in [m.model for m in client.list().models]
        out = client.generate(model=copy, prompt="Say hi", options={"num_predict": 2})
        assert out.done
        assert client.delete(copy).status == "success"
        assert f"{copy}:latest" not in [m.model for m in client.list().models]
    finally:
        for leftover in (name, copy):
            try:
                client.delete(leftover)
            except ollama.ResponseError:
                pass
    with pytest.raises(ollama.ResponseError) as info:
        client.delete(name)
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        client.create(model=name, from_=MODEL, parameters={"no_such_param": 1})
    assert info.value.status_code == 400 and "no_such_param" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.create(model=name, from_="/etc/passwd")
    assert info.value.status_code == 404


def test_ps_and_keep_alive_zero_unloads(client, server):
    client.generate(model=MODEL, prompt="x", options={"num_predict": 1})
    ps = client.ps().models
    entry = next(m for m in ps if m.model == f"{MODEL}:latest")
    assert entry.size > 0 and entry.context_length == 256 and entry.details.format == "gguf"
    raw = httpx2.get(f"{server.url}/api/ps").json()["models"][0]
    assert set(raw) >= {
        "name",
        "model",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
    }
    out = client.generate(model=MODEL, keep_alive=0)
    assert out.done_reason == "unload"
    assert f"{MODEL}:latest" not in [m.model for m in client.ps().models]
    assert client.generate(model=MODEL, keep_alive=0).done_reason == "unload"  # not loaded: ok
    out = client.generate(model=MODEL)  # a load request loads it again
    assert out.done_reason == "load"
    assert f"{MODEL}:latest" in [m.model for m in client.ps().models]


def test_llama_server_utility_endpoints(server):
    lm = server.app.state.tandem.registry.find(MODEL).lm
    r = httpx2.post(f"{server.url}/tokenize", json={"content": "Hello world"})
    assert r.json()["tokens"] == lm.tokenizer.encode("Hello world", add_special=False)
    r = httpx2.post(f"{server.url}/tokenize", json={"content": "Hello world", "with_pieces": True})
    pieces = r.json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world"
    ids = [p["id"] for p in pieces]
    r = httpx2.post(f"{server.url}/detokenize", json={"tokens": ids})
    assert r.json()["content"] == "Hello world"
    r = httpx2.post(f"{server.url}/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    msgs = [{"role": "user", "content": "Hi"}]
    prompt = httpx2.post(f"{server.url}/apply-template", json={"messages": msgs}).json()["prompt"]
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_v1_model_by_id(server):
    r = httpx2.get(f"{server.url}/v1/models/{MODEL}:latest")
    assert r.status_code == 200 and r.json()["id"] == f"{MODEL}:latest"
    assert httpx2.get(f"{server.url}/v1/models/{MODEL}").json()["object"] == "model"
    r = httpx2.get(f"{server.url}/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# -- embeddings -------------------------------------------------------------------------------

REFERENCE = Path(__file__).parent / "data" / "smollm2_embeddings.llamacpp.json"


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


def _cos(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(a @ b / (a.norm() * b.norm()))


def test_embeddings_match_llama_cpp_and_do_not_depend_on_the_batch(server, reference):
    """llama-server --embeddings --pooling mean on the same GGUF recorded the vectors."""
    served = server.app.state.tandem.registry.find(MODEL)
    tok = served.lm.tokenizer
    ids = [tok.encode(s, add_special=True, parse_special=False) for s in reference["sentences"]]
    assert ids == reference["tokens"]
    batch = served.engine.embed(ids).result(timeout=120)  # (B, E)
    assert batch.shape == (len(ids), len(reference["embeddings"][0]))
    assert torch.allclose(batch.norm(dim=-1), torch.ones(len(ids)), atol=1e-5)
    cosines = [_cos(v, r) for v, r in zip(batch.tolist(), reference["embeddings"], strict=True)]
    assert min(cosines) >= 0.995, cosines
    alone = served.engine.embed(ids[:1]).result(timeout=60)[0]
    assert _cos(alone.tolist(), batch[0].tolist()) > 0.99999


def test_openai_embeddings(server, reference):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    sentences = reference["sentences"][:3]
    out = client.embeddings.create(model=MODEL, input=sentences)  # the client asks for base64
    assert [d.index for d in out.data] == [0, 1, 2]
    for d, r in zip(out.data, reference["embeddings"], strict=False):
        assert _cos(d.embedding, r) >= 0.995
    assert out.usage.prompt_tokens == sum(len(t) for t in reference["tokens"][:3])
    floats = client.embeddings.create(model=MODEL, input=sentences[0], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(out.data[0].embedding, abs=1e-6)
    short = client.embeddings.create(model=MODEL, input=reference["tokens"][0], dimensions=64)
    assert len(short.data[0].embedding) == 64
    assert sum(x * x for x in short.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[])


def test_langchain_openai_embeddings(server, reference):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(
        model=MODEL,
        base_url=f"{server.url}/v1",
        api_key="unused",
        check_embedding_ctx_length=False,  # it would send tiktoken ids of another vocabulary
    )
    docs = emb.embed_documents(reference["sentences"][:2])
    query = emb.embed_query(reference["sentences"][0])
    assert _cos(docs[0], reference["embeddings"][0]) >= 0.995
    assert _cos(query, docs[0]) > 0.9999


def test_ollama_embed_and_legacy_embeddings(client, reference):
    out = client.embed(model=MODEL, input=reference["sentences"][:2])
    assert len(out.embeddings) == 2 and out.prompt_eval_count == sum(
        len(t) for t in reference["tokens"][:2]
    )
    assert _cos(out.embeddings[1], reference["embeddings"][1]) >= 0.995
    legacy = client.embeddings(model=MODEL, prompt=reference["sentences"][0])
    assert _cos(legacy.embedding, reference["embeddings"][0]) >= 0.995
    long = "word " * 400  # > num_ctx 256 tokens
    assert len(client.embed(model=MODEL, input=long).embeddings[0]) == 576  # truncated
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model=MODEL, input=long, truncate=False)
    assert info.value.status_code == 400
