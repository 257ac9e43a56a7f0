"""A loopback HTTP server that speaks the Hugging Face hub's download protocol, for pull tests.

What huggingface_hub calls (read from its file_download.py / hf_api.py):
- GET  /api/models/{repo}[/revision/{rev}]?blobs=True  -> {"id", "sha", "siblings": [{"rfilename",
  "size", "blobId", "lfs": {"size", "sha256", "pointerSize"}}]}
- HEAD /{repo}/resolve/{rev}/{file}  -> 302 to /cdn/{sha256} with X-Repo-Commit, X-Linked-Etag,
  X-Linked-Size, ETag (as the hub answers for an LFS file)
- GET  /{repo}/resolve/{rev}/{file}  -> the same 302; GET /cdn/{sha256} serves the bytes with
  Range support (206, Content-Range).

Faults a test can switch on: `cut_after` (the next GET of file bytes closes the connection after
that many bytes, and later GETs answer 503 until `down` is cleared), `corrupt` (one byte of
the served file flipped). `served` counts file bytes sent, `requests` records (method, path,
Range header).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from loopback_server import LoopbackServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class HubFile:
    path: Path  # the bytes on disk (served in place, never copied)
    sha256: str
    size: int


class Hub(LoopbackServer):
    def __init__(self, repo: str, files: dict[str, HubFile]) -> None:
        self.repo = repo
        self.files = files
        self.by_sha = {f.sha256: f for f in files.values()}
        self.served = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_after: int | None = None
        self.down = False
        self.corrupt = False
        self.lock = threading.Lock()
        self.listen(_handler(self))

    def info(self) -> dict:
        siblings = [
            {
                "rfilename": name,
                "size": f.size,
                "blobId": f.sha256[:40],
                "lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": 134},
            }
            for name, f in self.files.items()
        ]
        siblings.append({"rfilename": "README.md", "size": 10, "blobId": "f" * 40})
        return {"id": self.repo, "modelId": self.repo, "sha": COMMIT, "siblings": siblings}


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            path = self.path.split("?")[0]
            hub.requests.append((self.command, path, self.headers.get("Range")))
            api = f"/api/models/{hub.repo}"
            if path == api or path.startswith(api + "/revision/"):
                return self._json(hub.info())
            resolve = re.fullmatch(rf"/{re.escape(hub.repo)}/resolve/([^/]+)/(.+)", path)
            if resolve and resolve.group(2) in hub.files:
                return self._redirect(hub.files[resolve.group(2)])
            cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
            if cdn and cdn.group(1) in hub.by_sha:
                return self._bytes(hub.by_sha[cdn.group(1)], head)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()

        def _json(self, data: dict) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, f: HubFile) -> None:
            self.send_response(302)
            self.send_header("Location", f"{hub.url}/cdn/{f.sha256}")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(f.size))
            self.send_header("ETag", f'"{f.sha256[:40]}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _bytes(self, f: HubFile, head: bool) -> None:
            if hub.down and not head:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = 0, f.size - 1
            m = _RANGE.fullmatch(self.headers.get("Range") or "")
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)), end) if m.group(2) else end
            self.send_response(206 if m else 200)
            if m:
                self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if head:
                return
            limit = None
            with hub.lock:
                if hub.cut_after is not None:
                    limit, hub.cut_after, hub.down = hub.cut_after, None, True
            self._send(f, start, end + 1, limit)

        def _send(self, f: HubFile, start: int, stop: int, limit: int | None) -> None:
            sent = 0
            with open(f.path, "rb") as src:
                src.seek(start)
                pos = start
                while pos < stop:
                    chunk = src.read(min(1 << 20, stop - pos))
                    if limit is not None and sent + len(chunk) > limit:
                        chunk = chunk[: limit - sent]
                    if hub.corrupt and pos <= f.size // 2 < pos + len(chunk):
                        i = f.size // 2 - pos
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                    try:
                        self.wfile.write(chunk)
                    except OSError:
                        return
                    sent += len(chunk)
                    pos += len(chunk)
                    with hub.lock:
                        hub.served += len(chunk)
                    if limit is not None and sent >= limit:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return

    return Handler
