"""`tandem ps`: ask a running server (GET /api/ps) which models it holds and print them as
ollama does: NAME ID SIZE PROCESSOR CONTEXT UNTIL; `tandem stop`: unload one."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.request

from quant.errors import ServerUnreachableError
from runtime.cli.terminal import printable

COLUMNS = ("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")


def fetch_ps(url: str, timeout: float = 5.0) -> list[dict]:
    try:
        with urllib.request.urlopen(f"{url}/api/ps", timeout=timeout) as resp:
            return json.loads(resp.read())["models"]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        raise ServerUnreachableError(
            f"no tandem server answered at {url} ({err}); start one "
            "with `tandem serve` or set TANDEM_HOST"
        ) from None


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def processor(size: int, size_vram: int) -> str:
    """ "100% CPU", "100% GPU" or "40%/60% CPU/GPU", from the bytes held in VRAM."""
    gpu = round(100 * size_vram / size) if size else 0
    if gpu <= 0:
        return "100% CPU"
    if gpu >= 100:
        return "100% GPU"
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def until(expires_at: str, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        when = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
        seconds = (when - now).total_seconds()
    except (ValueError, AttributeError, TypeError):
        return "?"  # a server's odd answer is not worth a traceback
    if seconds > 100 * 365 * 86400:
        return "Forever"
    if seconds < 1:
        return "Stopping..."
    for unit, scale in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= scale:
            n = int(seconds // scale)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "Stopping..."


def format_table(models: list[dict]) -> str:
    """The table; what the server said is shown inert (terminal escapes made visible)."""
    rows = [COLUMNS] + [
        tuple(
            printable(cell)
            for cell in (
                m["name"],
                str(m["digest"])[:12],
                human_size(m["size"]),
                processor(m["size"], m.get("size_vram", 0)),
                str(m.get("context_length", "")),
                until(m["expires_at"]),
            )
        )
        for m in models
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def stop_model(url: str, model: str, timeout: float = 30.0) -> None:
    """`tandem stop MODEL`: ask the server to unload MODEL now (ollama's way: a generate
    request without a prompt and keep_alive 0). ModelNotFoundError when it is not loaded."""
    from modelfiles.names import ModelName
    from quant.errors import ModelNotFoundError

    name = ModelName.maybe(model)
    wanted = {model, str(name)} if name is not None else {model}
    running = [m["name"] for m in fetch_ps(url)]
    match = next((n for n in running if n in wanted), None)
    if match is None:
        shown = ", ".join(printable(n) for n in running) or "none"
        raise ModelNotFoundError(
            f"model {printable(model)!r} is not running (running: {shown}); see `tandem ps`"
        )
    body = json.dumps({"model": match, "keep_alive": 0}).encode()
    req = urllib.request.Request(f"{url}/api/generate", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as err:
        raise ServerUnreachableError(f"the server at {url} did not unload {match}: {err}") from None
    deadline = time.monotonic() + timeout  # the server unloads it within a second
    while match in (m["name"] for m in fetch_ps(url)) and time.monotonic() < deadline:
        time.sleep(0.1)
