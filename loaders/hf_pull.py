"""Pulling GGUF files from a Hugging Face hub repository: `hf.co/USER/REPO[:QUANT]`.

The reference follows ollama's syntax: QUANT picks the GGUF by the quant tag in its file name
(`Q4_K_M`, case-insensitive); without one, the Q4_K_M file if the repo has one, else its only
GGUF. A split GGUF (`NAME-00001-of-00003.gguf`, ...) is pulled as the whole set, in order.

Everything goes through huggingface_hub (HfApi.model_info with files_metadata for the file
list and each file's LFS sha256 and size, get_hf_file_metadata for the resolve endpoint's
HEAD, http_get for the bytes, following the hub's redirect to its CDN). HF_ENDPOINT and
HF_TOKEN are read at each pull, not at import.

Each file downloads into TANDEM_HOME/models/blobs/sha256-<hex>.download (the sha256 the hub
lists), locked while this process writes it; an interrupted pull leaves it, and the next pull
resumes it with a Range request instead of starting again. The whole file is then hashed
("verifying") and renamed to its blob only when the hash is the hub's; a wrong file is
deleted and the pull refused.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from loaders.blobs import lock_path, locked, mark_verified, publish, sha256_file, verify
from loaders.pull import blob_path, tandem_home
from quant.errors import ModelNotFoundError, PullError

log = logging.getLogger(__name__)

PREFIXES = ("hf.co/", "huggingface.co/")
DEFAULT_QUANT = "Q4_K_M"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class HfRef:
    """A parsed `hf.co/USER/REPO[:QUANT]`; `quant` is None when no tag was given."""

    repo: str  # "USER/REPO", as typed (the hub's ids are case-insensitive)
    quant: str | None

    def name(self, quant: str) -> str:
        """The stored model's name: `hf.co/user/repo:quant` (lowercase, as ollama stores it)."""
        return f"hf.co/{self.repo}:{quant}".lower()


@dataclass(frozen=True)
class HubFile:
    """One GGUF file of the repo, as the hub lists it."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class HfModel:
    """What a pull found and fetched: the quant tag chosen and its blob(s), in split order."""

    ref: HfRef
    quant: str
    files: tuple[HubFile, ...]
    blobs: tuple[Path, ...]


def is_hf_ref(text: str) -> bool:
    return str(text).strip().lower().startswith(PREFIXES)


def parse_ref(text: str) -> HfRef:
    """`hf.co/USER/REPO[:QUANT]` (or huggingface.co/...); ModelNotFoundError for another shape."""
    body = text.strip()
    for prefix in PREFIXES:
        if body.lower().startswith(prefix):
            body = body[len(prefix) :]
            break
    repo, _, quant = body.partition(":")
    if not _REPO.fullmatch(repo) or ".." in repo:
        raise ModelNotFoundError(
            f"{text!r} is not a Hugging Face model reference: write hf.co/USER/REPO[:QUANT], "
            "e.g. hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"
        )
    if quant.lower() == "latest":
        quant = ""
    return HfRef(repo, quant or None)


def is_split(filename: str) -> bool:
    """A part of a split GGUF set (`NAME-00001-of-00003.gguf`)."""
    return _SPLIT.search(filename) is not None


def quant_tag(filename: str) -> str:
    """The quant tag in a GGUF file name: `Model-Q4_K_M.gguf` -> `Q4_K_M`, split suffix
    ignored (the last `-` or `.` separated part before .gguf)."""
    stem = _SPLIT.sub("", Path(filename).name)
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    return re.split(r"[-.]", stem)[-1]


def choose(files: list[HubFile], ref: HfRef) -> tuple[str, tuple[HubFile, ...]]:
    """The quant tag and the file(s) (a split set in order) the reference picks."""
    ggufs = [f for f in files if f.path.lower().endswith(".gguf")]
    by_quant: dict[str, list[HubFile]] = {}
    for f in ggufs:
        by_quant.setdefault(quant_tag(f.path).upper(), []).append(f)
    if not ggufs:
        raise ModelNotFoundError(f"hf.co/{ref.repo} has no .gguf file")
    wanted = (ref.quant or "").upper()
    if not wanted:
        if DEFAULT_QUANT in by_quant:
            wanted = DEFAULT_QUANT
        elif len(by_quant) == 1:
            wanted = next(iter(by_quant))
        else:
            raise ModelNotFoundError(
                f"hf.co/{ref.repo} has several GGUF files and no {DEFAULT_QUANT}; name one: "
                + ", ".join(f"hf.co/{ref.repo}:{q}" for q in sorted(by_quant))
            )
    if wanted not in by_quant:
        raise ModelNotFoundError(
            f"hf.co/{ref.repo} has no {wanted} GGUF; it has: {', '.join(sorted(by_quant))}"
        )
    return wanted, _split_set(by_quant[wanted], ref)


def _split_set(files: list[HubFile], ref: HfRef) -> tuple[HubFile, ...]:
    splits = [(f, _SPLIT.search(f.path)) for f in files]
    whole = [f for f, m in splits if m is None]
    if whole:
        if len(whole) > 1:
            raise ModelNotFoundError(
                f"hf.co/{ref.repo} has several files of that quant ("
                + ", ".join(f.path for f in whole)
                + "); tandem cannot tell which to use"
            )
        return (whole[0],)
    parts = sorted((int(m.group(1)), int(m.group(2)), f) for f, m in splits if m)
    count = parts[0][1]
    if [p[0] for p in parts] != list(range(1, count + 1)) or any(p[1] != count for p in parts):
        raise ModelNotFoundError(
            f"hf.co/{ref.repo}: the split GGUF set is incomplete ("
            + ", ".join(p[2].path for p in parts)
            + ")"
        )
    return tuple(p[2] for p in parts)


# ---- the hub ------------------------------------------------------------------------------


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def list_files(ref: HfRef) -> tuple[str, list[HubFile]]:
    """The repo's commit sha and its files with sizes and LFS sha256 (HfApi.model_info)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(endpoint=_endpoint(), token=_token())
    try:
        info = api.model_info(ref.repo, files_metadata=True)
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"hf.co/{ref.repo} was not found on {_endpoint()} (a private or gated repo needs "
            "HF_TOKEN set to a token that may read it)"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise PullError(f"could not list hf.co/{ref.repo} on {_endpoint()}: {err}") from None
    except Exception as err:  # the HTTP client's own errors (connection refused, timeouts)
        raise PullError(
            f"could not reach {_endpoint()} to list hf.co/{ref.repo} ({type(err).__name__}: {err})"
        ) from None
    files = []
    for s in info.siblings or []:
        lfs = s.lfs
        if s.rfilename.lower().endswith(".gguf"):
            if lfs is None or not lfs.sha256:
                raise PullError(
                    f"hf.co/{ref.repo}: the hub gives no sha256 for {s.rfilename}, so it "
                    "cannot be verified"
                )
            files.append(HubFile(s.rfilename, int(lfs.size), lfs.sha256.lower()))
    return info.sha or "main", files


def download(ref: HfRef, revision: str, f: HubFile) -> Path:
    """Fetch `f` into its blob (resuming a partial download), verify its sha256, return it."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    home = tandem_home()
    target = blob_path(f.sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock_path(home, f"pull-{f.sha256}")):
        if target.is_file() and verify(target, f.sha256):
            _say(f"{f.path}: already pulled")
            return target
        url = hf_hub_url(ref.repo, f.path, revision=revision, endpoint=_endpoint())
        try:
            meta = get_hf_file_metadata(url, token=_token(), endpoint=_endpoint())
        except Exception as err:  # huggingface_hub raises several types here
            raise PullError(f"hf.co/{ref.repo}: cannot reach {f.path}: {err}") from None
        if meta.etag and meta.etag.lower() != f.sha256:
            raise PullError(
                f"hf.co/{ref.repo}/{f.path}: the file's etag {meta.etag} is not the sha256 "
                f"{f.sha256} the repo lists; pull again later"
            )
        part = target.with_name(target.name + ".download")
        done = part.stat().st_size if part.is_file() else 0
        if done > f.size:
            part.unlink()
            done = 0
        if done:
            _say(f"{f.path}: resuming at {done / 1e6:.1f} of {f.size / 1e6:.1f} MB")
        headers = build_hf_headers(token=_token())
        try:
            with open(part, "ab") as out:
                http_get(
                    url,  # the resolve URL again: the hub redirects it to a fresh CDN address
                    out,
                    resume_size=done,
                    headers=headers,
                    expected_size=f.size,
                    displayed_filename=Path(f.path).name,
                )
        except Exception as err:  # network errors of several kinds; the partial file stays
            have = part.stat().st_size if part.is_file() else 0
            raise PullError(
                f"hf.co/{ref.repo}: downloading {f.path} stopped at {have / 1e6:.1f} of "
                f"{f.size / 1e6:.1f} MB ({type(err).__name__}: {err}); run the pull again "
                "to resume"
            ) from None
        _say("verifying sha256 digest")
        digest = sha256_file(part)
        if digest != f.sha256:
            part.unlink(missing_ok=True)
            raise PullError(
                f"hf.co/{ref.repo}/{f.path}: the downloaded bytes have sha256 {digest}, not "
                f"{f.sha256} as the hub lists; the file was deleted, pull again"
            )
        publish(part, target)
        mark_verified(target, f.sha256)
    return target


def pull_hf(text: str) -> HfModel:
    """List the repo, choose the GGUF(s) for the reference, download and verify each."""
    ref = parse_ref(text)
    _say(f"pulling manifest of hf.co/{ref.repo}")
    revision, files = list_files(ref)
    quant, chosen = choose(files, ref)
    blobs = tuple(download(ref, revision, f) for f in chosen)
    return HfModel(ref, quant, chosen, blobs)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def remote_headers(text: str) -> tuple[dict, dict, int]:
    """For `tandem plan` before a pull: the chosen GGUF's metadata and tensor table read with
    Range requests (a split set's tables joined). Returns (metadata, tensors, bytes read)."""
    from huggingface_hub import hf_hub_url

    from loaders.gguf_remote import http_fetcher, remote_header

    ref = parse_ref(text)
    revision, files = list_files(ref)
    _, chosen = choose(files, ref)
    metadata: dict | None = None
    tensors: dict = {}
    read = 0
    for f in chosen:
        url = hf_hub_url(ref.repo, f.path, revision=revision, endpoint=_endpoint())
        header, n = remote_header(http_fetcher(url, _token()), f.size, f"hf.co/{ref.repo}/{f.path}")
        metadata = metadata if metadata is not None else header.metadata
        tensors.update(header.tensors)
        read += n
    return metadata or {}, tensors, read
