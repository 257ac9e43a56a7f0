"""Guard: what every HTTP request passes before a handler sees it (a pure ASGI middleware,
outermost of the app's own), and the last word on errors a handler did not answer.

- Host: while the server listens on a loopback address, the Host header must name this
  machine, as ollama's allowedHost decides: empty, `localhost`, `*.localhost`, `*.local`,
  `*.internal`, the machine's hostname, or an IP literal that is loopback, private,
  unspecified or one of this machine's. Anything else is 403: a web page that rebinds its
  own DNS name to 127.0.0.1 cannot read the API. Listening on another address (0.0.0.0, a
  LAN address: an explicit choice to be reached from elsewhere) accepts any Host, as ollama.
- Origin: a request that carries one (browsers always do, cross-origin) must match the
  allowlist: ollama's (http and https on localhost, 127.0.0.1, 0.0.0.0, and here [::1],
  with or without a port; app://, file://, tauri://, vscode-webview://, vscode-file://),
  plus TANDEM_ORIGINS (comma-separated; `*` matches any run of characters, `*` alone any
  origin). Others get 403. An allowed origin gets CORS headers, and its preflight a 204.
- Content type: a request body must be JSON (`application/json` or `…+json`), else 415, so
  a page cannot drive the API with the "simple" requests a browser sends without asking.
  curl's default (`-d` sends application/x-www-form-urlencoded) is accepted when no Origin
  header comes with it: no browser sent that request.
- Key: with an API key set (`--api-key` or TANDEM_API_KEY), every request but /health and
  CORS preflights must carry `Authorization: Bearer KEY` (compared in constant time), else
  401 in the API's shape with `WWW-Authenticate: Bearer`.
- Size: a body longer than `max_body` bytes is refused with 413 while it is read, whether
  announced by Content-Length or chunked, before anything parses it; the rest of it (up to
  DRAIN_BYTES) is read and dropped so the client gets to read the answer.
- Errors: an exception that reaches this far becomes a 500 in the API's own error shape
  (OpenAI's under /v1, ollama's elsewhere), logged with its traceback, the connection kept
  open; the message names only the exception's type (it may quote what it should not).
- Ignored fields: each request gets a record of the body fields its handler accepted without
  using (lenient.py); a response that ignored any names them in X-Tandem-Ignored-Fields.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers

from quant.errors import InternalError, TandemError
from runtime.server import lenient
from runtime.server.address import DEFAULT_HOST
from runtime.server.errors import HTTPStatusError, error_for_path, status_of

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY = 8 * 2**20  # bytes
DRAIN_BYTES = 64 * 2**20  # at most this much of a refused body is read and dropped
ORIGINS_ENV = "TANDEM_ORIGINS"
API_KEY_ENV = "TANDEM_API_KEY"
OPEN_PATHS = {"/health"}  # answered without the API key
DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# the endpoints /metrics counts (an arbitrary path must not add a label value)
COUNTED = {"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"}


@dataclass(frozen=True)
class GuardOptions:
    max_body: int = DEFAULT_MAX_BODY
    bind_host: str = DEFAULT_HOST  # the address the server listens on
    origins: tuple[str, ...] = ()  # allowed beyond DEFAULT_ORIGINS (TANDEM_ORIGINS adds more)
    api_key: str | None = None  # required as `Authorization: Bearer KEY` when set


def env_origins() -> tuple[str, ...]:
    return tuple(o.strip() for o in os.environ.get(ORIGINS_ENV, "").split(",") if o.strip())


def _origin_pattern(origin: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(p) for p in origin.strip().lower().split("*")))


def listens_on_loopback(bind_host: str) -> bool:
    if bind_host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: resolved by the OS, may be any interface


@functools.lru_cache(maxsize=1)
def _local_addresses() -> frozenset[str]:
    """This machine's own addresses as far as its hostname resolves (best effort)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return frozenset()
    # (str(): typeshed allows an int host for address families getaddrinfo does not return)
    return frozenset(str(ipaddress.ip_address(str(i[4][0]).split("%")[0])) for i in infos)


def host_name(header: str) -> str:
    """The host part of a Host header, lowercase, without port or IPv6 brackets."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host


def allowed_host(header: str) -> bool:
    """ollama's allowedHost, with its IP-literal rule."""
    host = host_name(header)
    if host in ("", "localhost") or host.endswith(LOCAL_SUFFIXES):
        return True
    if host == socket.gethostname().lower():
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified or str(ip) in _local_addresses()


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class Guard:
    def __init__(self, app: Callable, options: GuardOptions | None = None) -> None:
        self.app = app
        self.options = options or GuardOptions()
        self.check_host = listens_on_loopback(self.options.bind_host)
        origins = (*DEFAULT_ORIGINS, *self.options.origins, *env_origins())
        self.any_origin = "*" in origins
        self.origins = [_origin_pattern(o) for o in origins]
        key = self.options.api_key or os.environ.get(API_KEY_ENV) or None
        self.api_key = key.encode() if key else None

    def origin_allowed(self, origin: str) -> bool:
        origin = origin.strip().lower()
        return self.any_origin or any(p.fullmatch(origin) for p in self.origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = []
                if origin:
                    extra += [
                        (b"access-control-allow-origin", origin.encode("latin-1")),
                        (b"access-control-expose-headers", lenient.HEADER.encode()),
                        (b"vary", b"Origin"),
                    ]
                if ignored:
                    extra.append((lenient.HEADER.encode(), lenient.header_value(ignored)))
                if extra:
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        headers = Headers(scope=scope)
        origin = headers.get("origin")
        ignored = lenient.begin()
        try:
            self._check(scope, headers)
            if origin and scope["method"] == "OPTIONS":
                await self._preflight(send, origin, headers)
                return
            self._authorize(path, headers)
            receive = await self._limit(headers, receive)
            await self.app(scope, receive, send_tracked)
        except Exception as err:
            if started:
                raise  # the status line is gone: uvicorn closes the connection
            if isinstance(err, TandemError):
                answer = err
            else:
                log.exception("unhandled error answering %s %s", scope.get("method"), path)
                answer = InternalError(
                    f"internal error ({type(err).__name__}); the server's log has the details"
                )
            self._count(scope, path, status_of(answer))
            origin = origin if origin and self.origin_allowed(origin) else None
            response = error_for_path(path, answer)
            if isinstance(err, HTTPStatusError) and err.status == 401:
                response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send_tracked)

    def _authorize(self, path: str, headers: Headers) -> None:
        """401 unless the API key is off, the path is open, or the Bearer token matches."""
        if self.api_key is None or path in OPEN_PATHS:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.api_key):
            raise HTTPStatusError(
                401,
                "this server needs an API key: send it as 'Authorization: Bearer KEY' "
                "(the key given to tandem serve --api-key or TANDEM_API_KEY)",
            )

    def _check(self, scope: Scope, headers: Headers) -> None:
        if self.check_host and not allowed_host(headers.get("host", "")):
            raise HTTPStatusError(
                403,
                "this server answers only requests addressed to this machine (Host "
                "localhost, 127.0.0.1, …); listen on 0.0.0.0 to be reached by other names",
            )
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin):
            raise HTTPStatusError(
                403,
                f"origin {origin[:200]!r} is not allowed; add it to {ORIGINS_ENV} "
                "(comma-separated) to let that page use this server",
            )
        has_body = headers.get("transfer-encoding") is not None or (
            headers.get("content-length", "0").strip() not in ("", "0")
        )
        content_type = headers.get("content-type", "")
        curl_form = content_type.split(";", 1)[0].strip().lower() == (
            "application/x-www-form-urlencoded"
        )
        if has_body and not _is_json(content_type) and not (curl_form and origin is None):
            raise HTTPStatusError(
                415,
                f"the request body must be JSON (Content-Type: application/json), "
                f"not {content_type[:100] or 'untyped'}",
            )

    async def _preflight(self, send: Send, origin: str, headers: Headers) -> None:
        allow = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
            (
                b"access-control-allow-headers",
                b"Authorization, Content-Type, User-Agent, Accept, X-Requested-With, "
                b"X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-OS, "
                b"X-Stainless-Arch, X-Stainless-Retry-Count, X-Stainless-Runtime, "
                b"X-Stainless-Runtime-Version, X-Stainless-Async, X-Stainless-Helper-Method, "
                b"X-Stainless-Poll-Helper, X-Stainless-Custom-Poll-Interval, "
                b"X-Stainless-Timeout, X-Stainless-Read-Timeout",
            ),
            (b"access-control-max-age", b"43200"),
            (b"vary", b"Origin"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": allow})
        await send({"type": "http.response.body", "body": b""})

    async def _limit(self, headers: Headers, receive: Receive) -> Receive:
        """`receive` that refuses the body (HTTPStatusError 413) once it passes max_body."""
        limit = self.options.max_body
        too_large = HTTPStatusError(
            413, f"the request body is larger than this server's limit of {limit} bytes"
        )
        length = headers.get("content-length")
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                raise HTTPStatusError(400, "Content-Length is not a number") from None
            if announced > limit:
                if announced <= DRAIN_BYTES:
                    await _drain(receive, announced)
                raise too_large
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_BYTES - seen)
                    raise too_large
            return message

        return limited

    @staticmethod
    def _count(scope: Scope, path: str, status: int) -> None:
        state = getattr(getattr(scope.get("app"), "state", None), "tandem", None)
        if path in COUNTED and state is not None:
            state.metrics.count_request(path, status)


async def _drain(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a body, at most `budget` bytes of it."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return
