"""A loopback HTTP server that speaks ollama's registry protocol (the OCI distribution API as
ollama uses it), for pull tests:

- GET /v2/{ns}/{name}/manifests/{tag} -> the manifest (application/vnd.docker.distribution.
  manifest.v2+json: schemaVersion 2, a config and the layers, each {mediaType, digest, size}),
  404 with a MANIFEST_UNKNOWN error for a name it does not hold, 401 for a name in
  `private`
- GET /v2/{ns}/{name}/blobs/sha256:{hex} -> 307 to /cdn/{hex} (registry.ollama.ai redirects
  blobs to its CDN the same way); GET /cdn/{hex} serves the bytes with Range support (206,
  Content-Range).

Faults a test can switch on: `cut_after` (the next GET of blob bytes closes the connection
after that many bytes; with `down_after_cut`, later blob GETs answer 503 until `down` is
cleared), `corrupt` (one byte of each served blob flipped). `served` counts blob bytes sent,
`requests` records (method, path, Range header, Accept header).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from loopback_server import LoopbackServer

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA = "application/vnd.ollama.image."
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass(frozen=True)
class Blob:
    media: str  # e.g. application/vnd.ollama.image.model
    path: Path  # the bytes on disk (served in place, never copied)
    sha256: str
    size: int


def blob(kind: str, path: Path, sha256: str | None = None) -> Blob:
    """A layer of media type `application/vnd.ollama.image.<kind>` served from `path`
    (its sha256 computed unless given)."""
    if sha256 is None:
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return Blob(MEDIA + kind, path, sha256, path.stat().st_size)


class Registry(LoopbackServer):
    def __init__(self, models: dict[str, list[Blob]]) -> None:
        """`models`: "namespace/name:tag" -> its layers."""
        self.models = models
        self.by_sha = {b.sha256: b for layers in models.values() for b in layers}
        self.private: set[str] = set()
        self.served = 0
        self.requests: list[tuple[str, str, str | None, str | None]] = []
        self.cut_after: int | None = None
        self.down_after_cut = False
        self.down = False
        self.corrupt = False
        self.lock = threading.Lock()
        self.listen(_handler(self))

    def manifest(self, key: str) -> bytes:
        config = {"mediaType": "application/vnd.docker.container.image.v1+json"}
        config |= {"digest": "sha256:" + "0" * 64, "size": 2}
        layers = [
            {"mediaType": b.media, "digest": f"sha256:{b.sha256}", "size": b.size}
            for b in self.models[key]
        ]
        body = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config}
        return json.dumps(body | {"layers": layers}).encode()


def _handler(reg: Registry):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base's name)
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            with reg.lock:
                reg.requests.append(
                    (self.command, path, self.headers.get("Range"), self.headers.get("Accept"))
                )
            manifest = re.fullmatch(r"/v2/([^/]+)/([^/]+)/manifests/([^/]+)", path)
            if manifest:
                return self._manifest("{}/{}:{}".format(*manifest.groups()))
            layer = re.fullmatch(r"/v2/([^/]+)/([^/]+)/blobs/sha256:([0-9a-f]{64})", path)
            if layer and layer.group(3) in reg.by_sha:
                return self._empty(307, {"Location": f"{reg.url}/cdn/{layer.group(3)}"})
            cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
            if cdn and cdn.group(1) in reg.by_sha:
                return self._bytes(reg.by_sha[cdn.group(1)])
            self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")

        def _manifest(self, key: str) -> None:
            if key in reg.private:
                return self._error(401, "UNAUTHORIZED", "authentication required")
            if key not in reg.models:
                return self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            body = reg.manifest(key)
            self._empty(200, {"Content-Type": MANIFEST_TYPE}, body)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
            self._empty(status, {"Content-Type": "application/json"}, body)

        def _empty(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _bytes(self, b: Blob) -> None:
            if reg.down:
                return self._error(503, "UNAVAILABLE", "try again later")
            start, end = 0, b.size - 1
            m = _RANGE.fullmatch(self.headers.get("Range") or "")
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)), end) if m.group(2) else end
            self.send_response(206 if m else 200)
            if m:
                self.send_header("Content-Range", f"bytes {start}-{end}/{b.size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            limit = None
            with reg.lock:
                if reg.cut_after is not None:
                    limit, reg.cut_after, reg.down = reg.cut_after, None, reg.down_after_cut
            self._send(b, start, end + 1, limit)

        def _send(self, b: Blob, start: int, stop: int, limit: int | None) -> None:
            sent, pos = 0, start
            with open(b.path, "rb") as src:
                src.seek(start)
                while pos < stop:
                    chunk = src.read(min(1 << 20, stop - pos))
                    if limit is not None:
                        chunk = chunk[: limit - sent]
                    if reg.corrupt and pos <= b.size // 2 < pos + len(chunk):
                        i = b.size // 2 - pos
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                    try:
                        self.wfile.write(chunk)
                    except OSError:
                        return
                    sent, pos = sent + len(chunk), pos + len(chunk)
                    with reg.lock:
                        reg.served += len(chunk)
                    if limit is not None and sent >= limit:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return

    return Handler
