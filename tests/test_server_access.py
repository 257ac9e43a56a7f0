"""Leniency and access: unknown request fields ignored and named in a header (or refused when
they would change the answer), the API key, CORS origins from the serve flags, and every
refusal in the requesting API's error shape. No model is loaded: requests name a model that
does not exist, so each is answered after its body was parsed (404) without any engine."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from runtime.server.app import create_app
from runtime.server.errors import RequestFieldError
from runtime.server.guard import GuardOptions
from runtime.server.lenient import HEADER
from runtime.server.models import ModelRegistry, RegistryOptions
from runtime.server.ollama_options import parse_options
from runtime.server.openai_request import parse_chat

CHAT = [{"role": "user", "content": "Hi"}]
KEY = "sk-test-0123456789"


def _client(**guard) -> TestClient:
    registry = ModelRegistry(RegistryOptions(models_dirs=()))
    app = create_app(registry=registry, guard=GuardOptions(**guard))
    return TestClient(app, base_url="http://localhost")


@pytest.fixture(scope="module")
def client():
    with _client() as c:
        yield c


@pytest.fixture(scope="module")
def keyed():
    with _client(api_key=KEY, origins=("https://ui.example",)) as c:
        yield c


# -- leniency ---------------------------------------------------------------------------------


def test_routine_extra_fields_are_ignored_and_named_in_a_header(client):
    body = {
        "model": "no-such-model",
        "messages": CHAT,
        "cache_prompt": True,
        "chat_template_kwargs": {"x": 1},
        "skip_special_tokens": True,
        "typical_p": 1.0,  # an unhonoured sampler at its "off" value changes nothing
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    named = set(r.headers[HEADER].split(", "))
    # (chat_template_kwargs may become a known field; the others stay ignored)
    assert {"cache_prompt", "skip_special_tokens", "typical_p"} <= named
    r = client.post("/api/generate", json={"model": "no-such-model", "prompt": "x", "raw_x": 1})
    assert r.status_code == 404 and r.headers[HEADER] == "raw_x"
    opts = {"model": "no-such-model", "prompt": "x", "options": {"n_ctx_x": 1}}
    r = client.post("/api/generate", json=opts)
    assert r.status_code == 404 and r.headers[HEADER] == "options.n_ctx_x"
    r = client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": CHAT})
    assert HEADER not in r.headers


@pytest.mark.parametrize(
    "extra",
    [
        {"guided_json": {"type": "object"}},
        {"typical_p": 0.5},
        {"mirostat": 2},
        {"use_beam_search": True},
        {"min_tokens": 5},
        {"add_generation_prompt": False},
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(client, extra):
    body = {"model": "no-such-model", "messages": CHAT, **extra}
    r = client.post("/v1/chat/completions", json=body)
    name = next(iter(extra))
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == name and name in err["message"]
    r = client.post("/api/generate", json={"model": "no-such-model", "prompt": "x", **extra})
    assert r.status_code == 400 and name in r.json()["error"]


def test_unhonoured_values_compare_as_their_own_type():
    with pytest.raises(RequestFieldError):
        parse_chat({"model": "m", "messages": CHAT, "typical_p": True})  # True is not 1.0
    parse_chat({"model": "m", "messages": CHAT, "use_beam_search": False})
    with pytest.raises(RequestFieldError, match="typical_p"):
        parse_options({"typical_p": 0.5})  # known, unsupported options stay checked
    assert parse_options({"temperature": 0.1, "unknown_opt": 3}).sampling == {"temperature": 0.1}


def test_every_refusal_is_in_the_apis_shape(client):
    for method, path in [("GET", "/v1/nope"), ("DELETE", "/v1/chat/completions")]:
        r = client.request(method, path)
        assert r.status_code in (404, 405) and set(r.json()["error"]) >= {"message", "type"}
    for method, path in [("GET", "/api/nope"), ("GET", "/api/chat")]:
        r = client.request(method, path)
        assert r.status_code in (404, 405) and isinstance(r.json()["error"], str)


# -- API key ----------------------------------------------------------------------------------


def test_api_key_is_required_except_on_health(keyed):
    assert keyed.get("/health").status_code == 200
    r = keyed.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    r = keyed.get("/api/tags", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    r = keyed.get("/api/tags", headers={"Authorization": KEY})  # no scheme
    assert r.status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert keyed.get("/api/tags", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("TANDEM_API_KEY", "env-key")
    with _client() as c:
        assert c.get("/api/version").status_code == 401
        ok = c.get("/api/version", headers={"Authorization": "Bearer env-key"})
        assert ok.status_code == 200


def test_openai_client_sends_the_key(keyed):
    import openai

    ok = openai.OpenAI(base_url="http://localhost/v1", api_key=KEY, http_client=keyed)
    assert isinstance(ok.models.list().data, list)
    bad = openai.OpenAI(
        base_url="http://localhost/v1", api_key="nope", http_client=keyed, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# -- CORS -------------------------------------------------------------------------------------


def test_cors_origins_flag_extends_the_allowlist_and_preflight_needs_no_key(keyed):
    pre = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    r = keyed.options("/v1/chat/completions", headers=pre)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://ui.example"
    assert "Authorization" in r.headers["access-control-allow-headers"]
    auth = {"Origin": "https://ui.example", "Authorization": f"Bearer {KEY}"}
    r = keyed.get("/v1/models", headers=auth)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
    assert HEADER in r.headers["access-control-expose-headers"]
    r = keyed.get("/v1/models", headers={**auth, "Origin": "https://other.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = keyed.get("/v1/models", headers={**auth, "Origin": "http://localhost:5173"})
    assert r.status_code == 200  # the localhost defaults stay


def test_serve_flags_reach_the_guard(monkeypatch):
    from runtime.cli import main as cli
    from runtime.server import app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "run", lambda app, host, port: seen.update(app=app))
    code = cli.main(
        ["serve", "--api-key", KEY, "--cors-origins", "https://a.example, https://b.example"]
    )
    assert code == 0
    with TestClient(seen["app"], base_url="http://localhost") as c:
        headers = {"Origin": "https://b.example", "Authorization": f"Bearer {KEY}"}
        assert c.get("/api/version", headers=headers).status_code == 200
        assert c.get("/api/version").status_code == 401
