"""The rough edges of issue 17 a new user met, each gone: one flag vocabulary on run, serve,
plan and bench; `--version`; `tandem help`; `tandem stop`; sizes need a unit; `serve --model`
exits when the model cannot load; one id per model in `list`, `/api/tags` and `/api/ps`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO

from runtime.cli.main import build_parser, main

SHARED = {  # flag → (dest, value given, value parsed)
    "-c": ("num_ctx", "1024", 1024),
    "--num-ctx": ("num_ctx", "1024", 1024),
    "-ngl": ("num_gpu", "3", 3),
    "--num-gpu": ("num_gpu", "3", 3),
    "-t": ("num_thread", "2", 2),
    "--threads": ("num_thread", "2", 2),
    "--gpu-memory": ("gpu_memory", "4GB", "4GB"),
    "--kv-cache-type": ("kv_cache_type", "q8_0", "q8_0"),
    "-np": ("parallel", "2", 2),
    "--parallel": ("parallel", "2", 2),
}
COMMANDS = {  # what each command takes of the shared flags (bench: threads and GPU layers)
    "run": ("run", "m"),
    "serve": ("serve",),
    "plan": ("plan", "m"),
}
HIDDEN = {"--kv-type": "kv_cache_type", "--num-thread": "num_thread", "--num-parallel": "parallel"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("flag", sorted(SHARED))
def test_every_model_command_takes_the_same_flags(command, flag):
    dest, given, parsed = SHARED[flag]
    if command == "plan" and flag in ("-t", "--threads"):
        pytest.skip("plan models no threads")
    args = build_parser().parse_args([*COMMANDS[command], flag, given])
    assert getattr(args, dest) == parsed


@pytest.mark.parametrize("flag", ["-t", "--threads", "-ngl", "--num-gpu"])
def test_bench_takes_the_shared_thread_and_layer_flags(flag):
    dest, given, parsed = SHARED[flag]
    assert getattr(build_parser().parse_args(["bench", "m", flag, given]), dest) == parsed


@pytest.mark.parametrize("alias, dest", sorted(HIDDEN.items()))
def test_old_spellings_still_work_but_are_not_shown(alias, dest, capsys):
    command = {"--num-thread": "run", "--num-parallel": "plan", "--kv-type": "plan"}[alias]
    value = "q8_0" if dest == "kv_cache_type" else "2"
    args = build_parser().parse_args([command, "m", alias, value])
    assert str(getattr(args, dest)) == value
    assert main(["help", command]) == 0
    assert alias not in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("tandem version 0.")


def test_help_lists_commands_and_explains_one(capsys):
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "serve", "plan", "bench", "stop", "pull", "list"):
        assert command in out
    assert main(["help", "serve"]) == 0
    out = capsys.readouterr().out
    assert "--kv-cache-type" in out and "-np" in out and "--gpu-memory" in out


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["plan", "smollm2", "--gpu-memory", "4"], "4GB"),
        (["run", "smollm2", "hi", "--gpu-memory", "4"], "4GB"),
        (["serve", "--gpu-memory", "2.5"], "2.5GB"),
        (["serve", "--max-body-size", "8"], "8MB"),
    ],
)
def test_sizes_need_a_unit(argv, hint, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "needs a unit" in err and hint in err, err


# -- tandem stop, against a loopback server speaking /api/ps and /api/generate ------------------


class FakeServer(BaseHTTPRequestHandler):
    models = ["smollm2:latest"]
    bodies: list[dict] = []

    def do_GET(self):
        body = json.dumps({"models": [{"name": n} for n in self.models]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeServer.bodies.append(data)
        if data.get("keep_alive") == 0:
            FakeServer.models = [m for m in self.models if m != data["model"]]
        body = b'{"done": true, "done_reason": "unload"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_stop_unloads_a_running_model_by_its_short_name(fake_server, capsys):
    FakeServer.models, FakeServer.bodies = ["smollm2:latest"], []
    assert main(["stop", "smollm2", "--host", fake_server]) == 0
    assert FakeServer.bodies == [{"model": "smollm2:latest", "keep_alive": 0}]
    assert FakeServer.models == []
    assert main(["stop", "smollm2", "--host", fake_server]) == 1
    err = capsys.readouterr().err
    assert "not running" in err and "tandem ps" in err


def test_stop_without_a_server_says_how_to_start_one(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["stop", "smollm2", "--host", f"127.0.0.1:{port}"]) == 1
    assert "tandem serve" in capsys.readouterr().err


# -- serve --model that cannot load ------------------------------------------------------------


def test_serve_exits_non_zero_when_its_model_cannot_load(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    res = subprocess.run(
        [sys.executable, "-m", "runtime.cli.main", "serve", "--port", str(port)]
        + ["--model", str(bad)],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert "could not load" in res.stderr and "broken.gguf" in res.stderr


# -- one id per model --------------------------------------------------------------------------


def test_list_tags_and_ps_give_a_model_the_same_id(smollm2_path, capsys):
    from modelfiles.names import ModelName
    from modelfiles.store import Store
    from runtime.server.ollama_info import local_models, model_digest

    assert main(["pull", "smollm2"]) == 0
    manifest = Store().get(ModelName.parse("smollm2"))
    assert manifest is not None
    capsys.readouterr()
    assert main(["list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("smollm2"))
    assert row.split()[1] == manifest.id
    tags = {m["name"]: m["digest"] for m in local_models([])}
    assert tags["smollm2:latest"].startswith(manifest.id)
    # /api/ps builds its digest the same way from the served name and the loaded file
    assert model_digest("smollm2:latest", smollm2_path).startswith(manifest.id)
    assert model_digest(str(smollm2_path), smollm2_path) == smollm2_path.name.removeprefix(
        "sha256-"
    )


# -- tandem run through a running server -------------------------------------------------------


class FakeOllama(BaseHTTPRequestHandler):
    """/api/version, /api/generate (the load) and /api/chat streamed as NDJSON."""

    requests: list[tuple[str, dict]] = []

    def _send(self, body: bytes, kind: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(b'{"version": "0.1.0"}')

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOllama.requests.append((self.path, data))
        if self.path == "/api/generate":
            time.sleep(0.5)  # the model loads
            self._send(b'{"done": true, "done_reason": "load"}')
            return
        parts = [{"message": {"content": w}, "done": False} for w in ("Hello", " from", " far")]
        parts.append(
            {
                "message": {"content": ""},
                "done": True,
                "prompt_eval_count": 7,
                "prompt_eval_duration": 10**8,
                "eval_count": 3,
                "eval_duration": 3 * 10**8,
                "load_duration": 0,
            }
        )
        self._send("".join(json.dumps(p) + "\n" for p in parts).encode(), "application/x-ndjson")

    def log_message(self, format, *args):
        pass


def test_run_uses_a_running_server_and_local_does_not(capsys):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{srv.server_address[1]}"
    try:
        FakeOllama.requests = []
        argv = ["run", "smollm2", "Say hi", "--host", host, "--temperature", "0", "--verbose"]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert out == "Hello from far\n"
        assert f"answered by the server at http://{host}" in err
        assert [p for p, _ in FakeOllama.requests] == ["/api/generate", "/api/chat"]
        chat = FakeOllama.requests[1][1]
        assert chat["messages"] == [{"role": "user", "content": "Say hi"}]
        assert chat["options"] == {"temperature": 0.0}

        # ollama's timings from the server: total includes its load
        def figure(name: str) -> float:
            return float(next(x for x in err.splitlines() if x.startswith(name)).split()[-1][:-1])

        assert figure("load duration") >= 0.5
        assert figure("total duration") >= figure("load duration")
    finally:
        srv.shutdown()
    # --host names a server that does not answer: said, not a silent local load
    assert main(["run", "smollm2", "hi", "--host", host]) == 1
    assert "no server answered" in capsys.readouterr().err
