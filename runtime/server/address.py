"""Where the server listens: --host/--port, else TANDEM_HOST ("host:port", "host",
":port" or "http://host:port"), else 127.0.0.1:11435."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from quant.errors import InvalidParameterError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11435


def parse_address(value: str) -> tuple[str, int]:
    text = value.strip()
    parts = urlsplit(text if "//" in text else f"//{text}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InvalidParameterError(
            f"TANDEM_HOST={value!r} has a bad port; write host:port, e.g. 127.0.0.1:{DEFAULT_PORT}"
        ) from None
    return parts.hostname or DEFAULT_HOST, port


def server_address(host: str | None = None, port: int | None = None) -> tuple[str, int]:
    env_host, env_port = parse_address(os.environ.get("TANDEM_HOST", ""))
    return host or env_host, port or env_port


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}"
