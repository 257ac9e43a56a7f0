"""ServerState: what every handler shares — the model registry, the metrics, the preloaded
model's status — kept on `app.state.tandem`; and reading a JSON body."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from modelfiles import local_stores
from modelfiles.store import Store
from runtime.server.errors import RequestFieldError
from runtime.server.metrics import ServerMetrics
from runtime.server.models import ModelRegistry


@dataclass
class ServerState:
    registry: ModelRegistry
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    preload: str | None = None  # the model named by --model
    preload_error: str | None = None
    started: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        """No preload was asked for, or it has finished loading."""
        return self.preload is None or self.registry.find(self.preload) is not None

    def model_names(self) -> list[tuple[str, int]]:
        """(name, created unix time) of every loaded or stored model, loaded ones first, then
        the models other tools keep."""
        out = [(m.name, int(m.loaded_at)) for m in self.registry.loaded()]
        seen = {name for name, _ in out}
        for name, manifest in Store().list():
            if str(name) not in seen:
                created = dt.datetime.fromisoformat(manifest.created_at).timestamp()
                out.append((str(name), int(created)))
                seen.add(str(name))
        # then what other tools keep, used in place (modelfiles/local_stores.py)
        out += [(m.name, int(m.mtime)) for m in local_stores.models() if m.name not in seen]
        return out


def server_state(request: Request) -> ServerState:
    return request.app.state.tandem


MAX_DEPTH = 64  # arrays and objects nested deeper than this are refused
MAX_INT = 2**64  # integers of this size or more are refused (no field takes one)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestFieldError(None, f"the number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20 or abs(value := int(text)) >= MAX_INT:
        raise RequestFieldError(None, f"the integer {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise RequestFieldError(None, f"{name} is not a JSON number; give a finite number")


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in `value` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, bounded: numbers finite and of sane size (no NaN, Infinity,
    1e400 or 4000-digit integers), nesting at most MAX_DEPTH deep; RequestFieldError else."""
    try:
        value = json.loads(
            raw,
            parse_float=_finite,
            parse_int=_bounded_int,
            parse_constant=_no_constant,
        )
    except RecursionError:
        value = None
        deep = True
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestFieldError(None, f"the request body is not valid JSON ({err})") from None
    else:
        deep = _depth(value) > MAX_DEPTH
    if deep:
        raise RequestFieldError(
            None, f"the request body nests arrays or objects more than {MAX_DEPTH} deep"
        )
    return value


async def read_json(request: Request) -> Any:
    """The body as bounded JSON (parse_json); the Guard has already limited its size."""
    return parse_json(await request.body())
