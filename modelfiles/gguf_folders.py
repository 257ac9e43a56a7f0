"""GGUF files in the Hugging Face hub cache and in LM Studio's models folder, read in place
(modelfiles/local_stores.py says where these folders are):

    <hub>/models--OWNER--REPO/refs/main                the commit `main` points at
    <hub>/models--OWNER--REPO/snapshots/<commit>/...   the repo's files (symlinks into blobs/)
    <lmstudio>/PUBLISHER/REPO/FILE.gguf

A repo's GGUF files are told apart by the quant tag in their names, as `tandem pull hf.co/...`
picks them (loaders/hf_pull.py): `hf.co/owner/repo:q4_k_m` in the HF cache,
`publisher/repo:q4_k_m` in LM Studio (found as `hf.co/publisher/repo:q4_k_m` too: LM Studio
downloads from the hub). Without a tag: the Q4_K_M file, else the repo's only one. Split sets
(`-00001-of-0000N`) and vision projectors (`mmproj-*`) are left out: tandem maps one GGUF per
model (`tandem pull hf.co/...` merges a split set into its own store).
"""

from __future__ import annotations

import re
from pathlib import Path

from loaders.hf_pull import DEFAULT_QUANT, is_split, quant_tag
from modelfiles.local_model import HUGGINGFACE, LMSTUDIO, LocalModel

_COMMIT = re.compile(r"[0-9a-f]{40}")
_HEX = re.compile(r"[0-9a-f]{64}")


# ---- the Hugging Face hub cache --------------------------------------------------------------


def hf_find(hub: Path, repo: str, quant: str | None) -> LocalModel | None:
    """The cached GGUF of hf.co/`repo` (OWNER/REPO) with that quant tag, None when the cache
    has none (then it is pulled)."""
    owner, _, name = repo.lower().partition("/")
    folder = _child(hub, f"models--{owner}--{name}")
    snapshot = _snapshot(folder) if folder is not None else None
    if snapshot is None:
        return None
    return _pick(_by_quant(snapshot, recursive=True), quant, f"hf.co/{repo}", HUGGINGFACE)


def hf_models(hub: Path) -> list[LocalModel]:
    out = []
    for folder in _children(hub):
        owner, sep, name = folder.name.removeprefix("models--").partition("--")
        snapshot = _snapshot(folder) if folder.name.startswith("models--") and sep else None
        if snapshot is not None:
            files = _by_quant(snapshot, recursive=True)
            out += [_model(f"hf.co/{owner}/{name}", q, p, HUGGINGFACE) for q, p in files.items()]
    return out


def _snapshot(folder: Path) -> Path | None:
    """The snapshot `main` points at, else the newest one."""
    try:
        commit = (folder / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        commit = ""
    snapshots = folder / "snapshots"
    if _COMMIT.fullmatch(commit) and (snapshots / commit).is_dir():
        return snapshots / commit
    found = [d for d in _children(snapshots) if d.is_dir()]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


# ---- LM Studio -------------------------------------------------------------------------------


def lms_find(root: Path, repo: str, quant: str | None) -> LocalModel | None:
    """The GGUF of PUBLISHER/REPO with that quant tag in LM Studio's folder, or None."""
    publisher, _, name = repo.lower().partition("/")
    pub = _child(root, publisher)
    folder = _child(pub, name) if pub is not None and "/" not in name else None
    if folder is None:
        return None
    return _pick(_by_quant(folder, recursive=False), quant, f"{publisher}/{name}", LMSTUDIO)


def lms_models(root: Path) -> list[LocalModel]:
    out = []
    for pub in _children(root):
        for folder in _children(pub):
            files = _by_quant(folder, recursive=False)
            repo = f"{pub.name}/{folder.name}"
            out += [_model(repo, q, p, LMSTUDIO) for q, p in files.items()]
    return out


# ---- shared ----------------------------------------------------------------------------------


def _by_quant(folder: Path, recursive: bool) -> dict[str, Path]:
    """quant tag (upper case) -> the one usable GGUF with it; a tag two files share is left
    out (which to use cannot be told)."""
    found: dict[str, list[Path]] = {}
    for path in folder.rglob("*") if recursive else _children(folder):
        name = path.name.lower()
        if name.endswith(".gguf") and not name.startswith("mmproj") and not is_split(name):
            if path.is_file():  # a dangling link (an unfinished download) is not
                found.setdefault(quant_tag(path.name).upper(), []).append(path)
    return {q: paths[0] for q, paths in found.items() if len(paths) == 1}


def _pick(files: dict[str, Path], quant: str | None, repo: str, source: str) -> LocalModel | None:
    wanted = (quant or "").upper()
    if not wanted or wanted == "LATEST":
        wanted = DEFAULT_QUANT if DEFAULT_QUANT in files or len(files) != 1 else next(iter(files))
    path = files.get(wanted)
    return None if path is None else _model(repo, wanted, path, source)


def _model(repo: str, quant: str, path: Path, source: str) -> LocalModel:
    real = path.resolve()  # the HF cache's blob (its name is the file's sha256)
    stat = real.stat()
    digest = real.name if _HEX.fullmatch(real.name) else ""
    return LocalModel(
        f"{repo}:{quant}".lower(), source, real, stat.st_size, stat.st_mtime, digest[:12]
    )


def _child(folder: Path, name: str) -> Path | None:
    """folder/name, its name matched case-insensitively."""
    return next((c for c in _children(folder) if c.name.lower() == name.lower()), None)


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []
