"""keep_alive: how long a model stays loaded after a request, in ollama's notation.

A number is seconds; a string is a number of seconds ("3600", "-1") or a Go-style duration
("5m", "1h30m", "250ms"). Negative means forever (math.inf); 0 unloads when the request ends.
Non-finite values (NaN, 1e400) are refused; FOREVER seconds (31 years) or more mean forever.
"""

from __future__ import annotations

import math
import re

from runtime.server.errors import RequestFieldError

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_ALLOWED = 'a number of seconds, or a duration such as "5m", "1h" or "-1" (forever)'
FOREVER = 1e9  # seconds


def parse_keep_alive(value: object) -> float:
    """Seconds to keep the model loaded; math.inf for a negative value."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestFieldError("keep_alive", f"keep_alive must be {_ALLOWED}, got {value!r}")
    seconds = _duration(value.strip()) if isinstance(value, str) else float(value)
    if seconds is None or not math.isfinite(seconds):
        raise RequestFieldError("keep_alive", f"keep_alive must be {_ALLOWED}, got {value!r}")
    return math.inf if seconds < 0 or seconds >= FOREVER else seconds


def _duration(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        pass
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    parts = _PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        return None
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)
