"""Pulling from an ollama registry: `NAME[:TAG]`, `NS/NAME[:TAG]`, `HOST[:PORT]/NS/NAME[:TAG]`
(ollama's names: namespace `library`, tag `latest` when not given).

The protocol is the OCI distribution API as ollama speaks it:

    GET {registry}/v2/{ns}/{name}/manifests/{tag}      Accept: application/vnd.docker.
        distribution.manifest.v2+json -> {"layers": [{"mediaType", "digest", "size"}, ...]}
    GET {registry}/v2/{ns}/{name}/blobs/sha256:{hex}   -> the bytes, or a redirect to a CDN
                                                          (followed)

A name without a host goes to TANDEM_OLLAMA_REGISTRY (default https://registry.ollama.ai;
`off`: tandem never asks a registry); a name with one to https://HOST (http:// for a loopback
host: 127.0.0.1, localhost).

Each blob downloads into TANDEM_HOME/models/blobs/sha256-<hex>.download, locked while this
process writes it. A connection cut mid-blob is resumed with a Range request (RETRIES times
within the pull; the partial file stays, so the next pull resumes it too). The whole file is
then hashed ("verifying sha256 digest") and renamed to its blob only when the hash is the
digest; wrong bytes are deleted and the pull refused (DigestMismatchError).
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loaders.blobs import CHUNK, lock_path, locked, mark_verified, publish, sha256_file, verify
from loaders.progress import DownloadBar, human
from loaders.pull import KNOWN, blob_path, tandem_home
from quant.errors import (
    DigestMismatchError,
    InvalidParameterError,
    ModelNotFoundError,
    PullError,
    RegistryUnreachableError,
)

REGISTRY_ENV = "TANDEM_OLLAMA_REGISTRY"
DEFAULT_REGISTRY = "https://registry.ollama.ai"
HOST, NAMESPACE, TAG = "registry.ollama.ai", "library", "latest"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
RETRIES = 3  # tries per blob within one pull (a cut connection resumes where it stopped)
TIMEOUT_S = 30.0
_LOOPBACK = ("127.0.0.1", "localhost")
_MAX_MANIFEST = 1 << 20
_PART = re.compile(r"[a-z0-9][a-z0-9_.-]{0,79}")
_HOST = re.compile(r"[a-z0-9][a-z0-9.-]{0,252}(:[0-9]{1,5})?")
_TAG = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,79}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class RegistryRef:
    """A parsed registry name; `host` is None when the name gives none (the configured
    registry is asked)."""

    host: str | None
    namespace: str
    model: str
    tag: str

    @property
    def base(self) -> str:
        """The registry's URL: the name's host, else TANDEM_OLLAMA_REGISTRY's."""
        if self.host is None or self.host == HOST:
            return registry_url() or DEFAULT_REGISTRY
        loopback = self.host.split(":")[0] in _LOOPBACK
        return f"{'http' if loopback else 'https'}://{self.host}"

    def url(self, kind: str, reference: str) -> str:
        return f"{self.base}/v2/{self.namespace}/{self.model}/{kind}/{reference}"


def registry_url() -> str | None:
    """TANDEM_OLLAMA_REGISTRY (default https://registry.ollama.ai), None when it is `off`."""
    text = os.environ.get(REGISTRY_ENV, "").strip()
    if text.lower() in ("off", "none"):
        return None
    url = (text or DEFAULT_REGISTRY).rstrip("/")
    if not url.startswith(("https://", "http://")):
        raise InvalidParameterError(
            f"{REGISTRY_ENV}={text}: give the registry's URL (https://HOST[:PORT]), or off"
        )
    return url


def enabled() -> bool:
    return registry_url() is not None


def parse_ref(text: str) -> RegistryRef:
    """ollama's `[HOST[:PORT]/][NS/]NAME[:TAG]`; ModelNotFoundError for another shape."""
    head, _, last = text.strip().lower().rpartition("/")
    model, _, tag = last.partition(":")
    parts = head.split("/") if head else []
    host = parts[0] if len(parts) == 2 else None
    namespace = parts[-1] if parts else NAMESPACE
    ok = (
        len(parts) <= 2
        and _PART.fullmatch(model)
        and _PART.fullmatch(namespace)
        and (host is None or _HOST.fullmatch(host))
        and (not tag or _TAG.fullmatch(tag))
        and ".." not in text
    )
    if not ok:
        raise ModelNotFoundError(
            f"{text!r} is not a registry model name: write NAME[:TAG], NAMESPACE/NAME[:TAG] or "
            "HOST[:PORT]/NAMESPACE/NAME[:TAG], e.g. llama3.2:1b"
        )
    return RegistryRef(host, namespace, model, tag or TAG)


# ---- HTTP ---------------------------------------------------------------------------------


def _open(ref: RegistryRef, url: str, headers: dict[str, str], name: str, what: str):
    """The response to GET `url` (redirects followed); typed errors for what went wrong."""
    request = urllib.request.Request(url, headers={"User-Agent": "tandem", **headers})
    handlers = [urllib.request.ProxyHandler({})] if ref.base.startswith("http://") else []
    try:
        return urllib.request.build_opener(*handlers).open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise _refused(ref, err.code, name, what) from None
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise RegistryUnreachableError(
            f"{name}: could not reach the registry {ref.base} ({reason}); check the network, "
            f"or point {REGISTRY_ENV} at a registry that answers"
        ) from None


def _refused(ref: RegistryRef, code: int, name: str, what: str) -> Exception:
    if code == 404 and what == "manifest":
        return ModelNotFoundError(
            f"model {name!r} was not found on the registry {ref.base} (404): check the name "
            "and tag (https://ollama.com/library lists the library's models; tandem's own "
            f"catalog: {', '.join(sorted(KNOWN))})"
        )
    if code in (401, 403):
        return PullError(
            f"{name}: the registry {ref.base} refused access ({code}): the model is private "
            f"or needs a login, and tandem pulls public models only (`ollama pull {name}` "
            "pulls it with your key; tandem then uses ollama's copy in place)"
        )
    later = "run the pull again later to resume" if what == "layer" else "try again later"
    return PullError(f"{name}: the registry {ref.base} answered {code} for the {what}; {later}")


def fetch_manifest(ref: RegistryRef, name: str) -> bytes:
    """The manifest's JSON bytes (at most 1 MiB)."""
    _say(f"pulling manifest of {name} from {ref.base}")
    url = ref.url("manifests", ref.tag)
    with _open(ref, url, {"Accept": MANIFEST_TYPE}, name, "manifest") as response:
        try:
            data = response.read(_MAX_MANIFEST + 1)
        except (OSError, http.client.HTTPException) as err:
            raise RegistryUnreachableError(
                f"{name}: the manifest's download broke: {err}"
            ) from None
    if len(data) > _MAX_MANIFEST:
        raise PullError(f"{name}: the registry's manifest is larger than {_MAX_MANIFEST} bytes")
    return data


# ---- blobs --------------------------------------------------------------------------------


def fetch_blob(ref: RegistryRef, digest: str, size: int, name: str) -> Path:
    """The verified blob of a layer in tandem's store, downloaded (or resumed) unless present."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise PullError(f"{name}: a layer's digest {digest[:80]!r} is not sha256:<64 hex>")
    hexdigest = match[1]
    target = blob_path(hexdigest)
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock_path(tandem_home(), f"pull-{hexdigest}")):
        if target.is_file() and target.stat().st_size == size and verify(target, hexdigest):
            _say(f"pulling {hexdigest[:12]}: already here ({human(size)})")
            return target
        part = target.with_name(target.name + ".download")
        try:
            _download(ref, hexdigest, size, part, name)
        except DigestMismatchError:
            part.unlink(missing_ok=True)
            raise
        _say("verifying sha256 digest")
        got = sha256_file(part)
        if got != hexdigest:
            part.unlink(missing_ok=True)
            raise DigestMismatchError(
                f"{name}: the layer downloaded from {ref.base} has sha256 {got}, not {hexdigest} "
                f"as its manifest says; it was deleted and nothing was registered. Pull again "
                f"(`tandem pull {name}`); if it fails again the registry serves damaged data"
            )
        publish(part, target)
        mark_verified(target, hexdigest)
    return target


def _download(ref: RegistryRef, hexdigest: str, size: int, part: Path, name: str) -> None:
    """Bring `part` to `size` bytes, resuming it with Range requests after a cut connection."""
    bar = DownloadBar(f"pulling {hexdigest[:12]}", size)
    cause: BaseException | None = None
    try:
        for attempt in range(RETRIES):
            done = _have(part, size)
            if done == size:
                return
            if attempt:
                bar(done, now_please=True)
                _say(f"\nresuming {hexdigest[:12]} at {human(done)} of {human(size)}")
                time.sleep(0.2 * attempt)
            try:
                _transfer(ref, hexdigest, part, done, size, bar, name)
            except (OSError, http.client.HTTPException, RegistryUnreachableError) as err:
                cause = err  # the connection broke: what reached the disk stays
    finally:
        bar.close()
    if _have(part, size) == size:
        return
    raise PullError(
        f"{name}: downloading layer {hexdigest[:12]} stopped at {human(_have(part, size))} of "
        f"{human(size)} ({type(cause).__name__}: {cause}); run the pull again to resume"
    )


def _have(part: Path, size: int) -> int:
    """Bytes of a partial download to resume from (0, and the file gone, when it is too big)."""
    done = part.stat().st_size if part.is_file() else 0
    if done > size:
        part.unlink()
        return 0
    return done


def _transfer(
    ref: RegistryRef, hexdigest: str, part: Path, done: int, size: int, bar, name: str
) -> None:
    headers = {"Range": f"bytes={done}-"} if done else {}
    url = ref.url("blobs", f"sha256:{hexdigest}")
    with _open(ref, url, headers, name, "layer") as response:
        if done and response.status != 206:
            done = 0  # the server sent the whole file: start again
        with open(part, "ab" if done else "wb") as out:
            _copy(response, out, done, size, bar, name)


def _copy(response, out: BinaryIO, done: int, size: int, bar, name: str) -> None:
    bar(done)
    while chunk := response.read(CHUNK):
        done += len(chunk)
        if done > size:
            raise DigestMismatchError(
                f"{name}: the registry sent more than the layer's {size} bytes; pull again"
            )
        out.write(chunk)
        bar(done)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
