"""ServerState: what every handler shares — the model registry, the metrics, the preloaded
model's status — kept on `app.state.tandem`; and reading a JSON body."""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

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
        """(name, created unix time) of every loaded or stored model, loaded ones first."""
        out = [(m.name, int(m.loaded_at)) for m in self.registry.loaded()]
        seen = {name for name, _ in out}
        for name, manifest in Store().list():
            if str(name) not in seen:
                created = dt.datetime.fromisoformat(manifest.created_at).timestamp()
                out.append((str(name), int(created)))
        return out


def server_state(request: Request) -> ServerState:
    return request.app.state.tandem


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestFieldError(None, f"the request body is not valid JSON ({err})") from None
