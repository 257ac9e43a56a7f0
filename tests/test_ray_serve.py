"""tandem on Ray Serve (issue 19): a local Ray cluster on loopback with two SmolLM2 replicas
at half a CPU each, driven through the openai client — both replicas serve, a conversation
stays on its replica and hits its prefix cache, streaming works, greedy output equals the
plain server's, and killing a replica leaves the endpoint answering."""

from __future__ import annotations

import json
import math
import socket
import time

import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'tandem[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed")

from test_server import Server  # noqa: E402

from runtime.server.app import create_app  # noqa: E402
from runtime.server.models import RegistryOptions  # noqa: E402
from runtime.server.ray_app import (  # noqa: E402
    PREFIX_HITS_HEADER,
    REPLICA_HEADER,
    RayOptions,
    affinity_key,
    build,
)
from runtime.server.ray_metrics import merge  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2"
NUM_CTX = 512
CHAT = [{"role": "user", "content": "Tell me about the moon."}]
SYSTEM = "You are a terse assistant. Answer in one short sentence. " * 4


def registry() -> RegistryOptions:
    return RegistryOptions(
        num_ctx=NUM_CTX, max_num_seqs=4, keep_alive=math.inf, load=(("num_thread", 1),)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(smollm2_path):
    """The replicas load the native kernel this process built (unless TANDEM_NATIVE=0)."""
    from kernels import native_loader

    if native_loader.enabled():
        native_loader.load()
    ray.init(num_cpus=2, include_dashboard=False, namespace="tandem-test", log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = RayOptions(model=MODEL, replicas=2, threads=1, num_cpus=0.5, registry=registry())
        serve.run(build(options, "tandem"), name="tandem", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.time() < deadline, "the replicas never became ready"
            time.sleep(0.2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, messages, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=8, **kw
    )
    return raw.headers, raw.parse()


def test_affinity_key_follows_the_conversation():
    def key(messages) -> str | None:
        body = json.dumps({"model": "m", "messages": messages}).encode()
        return affinity_key("/v1/chat/completions", body)

    turn1 = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]
    turn2 = [*turn1, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    other = [{"role": "system", "content": "s"}, {"role": "user", "content": "z"}]
    assert key(turn1) == key(turn2)
    assert key(turn1) != key(other)
    assert affinity_key("/v1/models", b"") is None


@pytest.fixture(scope="module")
def plain_greedy(smollm2_path) -> str:
    """The greedy answer to CHAT from a plain `tandem serve` (test_server's real uvicorn on
    loopback), started and stopped before the Ray cluster so the two never share the cores."""
    srv = Server(create_app(registry(), preload=MODEL))
    try:
        deadline = time.time() + 300
        while httpx.get(f"{srv.url}/health").status_code != 200:
            assert time.time() < deadline, "the plain server's model never became ready"
            time.sleep(0.1)
        body = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 8}
        out = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120).json()
    finally:
        srv.stop()
    return out["choices"][0]["message"]["content"]


def test_greedy_equals_plain_server_and_both_replicas_serve(plain_greedy, client):
    replicas = set()
    for i in range(8):  # different first messages spread over the least-loaded replicas
        headers, out = chat(client, [{"role": "system", "content": f"session {i}"}, *CHAT])
        replicas.add(headers[REPLICA_HEADER])
    assert len(replicas) == 2, f"only {replicas} served"
    headers, out = chat(client, CHAT)
    assert out.choices[0].message.content == plain_greedy


def test_conversation_stays_on_one_replica_with_prefix_hits(client):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi."}]
    served, hits = set(), []
    for turn in range(3):
        headers, out = chat(client, messages)
        served.add(headers[REPLICA_HEADER])
        hits.append(int(headers[PREFIX_HITS_HEADER]))
        messages += [
            {"role": "assistant", "content": out.choices[0].message.content or ""},
            {"role": "user", "content": f"And then {turn}?"},
        ]
    assert len(served) == 1, f"the conversation moved: {served}"
    assert hits[2] > hits[0], f"no prefix-cache hits on the replica: {hits}"


def test_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=8, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    _, whole = chat(client, CHAT)
    assert text == whole.choices[0].message.content


def test_merge_keeps_families_together_and_labels_every_sample():
    a = '# HELP t_req Requests.\n# TYPE t_req counter\nt_req{model="m"} 3\n# TYPE t_up gauge\nt_up 1\n'
    b = '# HELP t_req Requests.\n# TYPE t_req counter\nt_req{model="m"} 5\n# TYPE t_up gauge\nt_up 1\n'
    assert merge({"r2": b, "r1": a}).splitlines() == [
        "# HELP t_req Requests.",
        "# TYPE t_req counter",
        't_req{replica="r1",model="m"} 3',
        't_req{replica="r2",model="m"} 5',
        "# TYPE t_up gauge",
        't_up{replica="r1"} 1',
        't_up{replica="r2"} 1',
    ]


def test_metrics_page_has_every_replica(client, endpoint):
    seen: set[str] = set()
    for _ in range(4):
        headers, _ = chat(client, [{"role": "system", "content": f"m {time.time()}"}, *CHAT])
        seen.add(headers[REPLICA_HEADER])
    assert len(seen) == 2
    deadline = time.time() + 20  # replicas post every 2 s
    while True:
        page = httpx.get(f"{endpoint}/metrics", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
        labelled = {r for r in seen if f'replica="{r}"' in page.text}
        if labelled == seen or time.time() > deadline:
            break
        time.sleep(0.5)
    assert labelled == seen, page.text[:2000]
    types = [line.split()[2] for line in page.text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), "a metric family appears twice"


def test_killed_replica_leaves_endpoint_answering(client, endpoint):
    headers, _ = chat(client, CHAT)
    victim = headers[REPLICA_HEADER]
    actor = next(
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if victim in a["name"] and "TandemEngine" in a["name"]
    )
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    answered = 0
    deadline = time.time() + 30
    while answered < 3 and time.time() < deadline:
        try:
            headers, out = chat(client, [{"role": "system", "content": str(time.time())}, *CHAT])
        except openai.APIStatusError as err:  # a request routed to the dead one: a clear 5xx
            assert err.status_code in (502, 503), err
            continue
        assert headers[REPLICA_HEADER] != victim
        assert out.choices[0].message.content
        answered += 1
    assert answered == 3, "the endpoint stopped answering after a replica was killed"
