"""Manifest: one stored model (name:tag) — which blobs it uses and what its Modelfile set.

Stored as JSON at TANDEM_HOME/models/manifests/<name>/<tag>.json:

    {"schema": 1,
     "model": {"digest": "sha256:<hex>", "size": 98441280},     the GGUF blob
     "adapters": [{"digest": ..., "size": ...}],                LoRA GGUF blobs, in order
     "parameters": {"temperature": 0.3, "stop": ["<|im_end|>"]}, typed (parameters.py)
     "template": "<Go template>" | null, "system": "..." | null,
     "license": ["..."], "messages": [{"role": "user", "content": "Hello"}],
     "parent": "smollm2:latest" | null, "quantization": "Q8_0" | null,
     "created_at": "2025-01-01T00:00:00+00:00"}

`parent`, `quantization` and `created_at` record provenance only: two manifests are equal
when they would run the same model the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from modelfiles.modelfile import Modelfile
from runtime.errors import ModelNotFoundError

SCHEMA = 1


@dataclass(frozen=True)
class Layer:
    digest: str  # "sha256:<64 hex>"
    size: int

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass
class Manifest:
    model: Layer
    adapters: list[Layer] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    license: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    parent: str | None = field(default=None, compare=False)
    quantization: str | None = field(default=None, compare=False)
    created_at: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.created_at:
            self.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    @property
    def size(self) -> int:
        return self.model.size + sum(a.size for a in self.adapters)

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self)}, indent=1, ensure_ascii=False)

    @property
    def id(self) -> str:
        """ollama's ID column: the start of the manifest's sha256."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
            if data.pop("schema", None) != SCHEMA:
                raise ValueError(f"schema is not {SCHEMA}")
            data["model"] = Layer(**data["model"])
            data["adapters"] = [Layer(**a) for a in data.get("adapters", [])]
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ModelNotFoundError(
                f"the manifest {where} is damaged ({err}); remove it with "
                "`tandem rm` and create the model again"
            ) from None

    def to_modelfile(self, blob_path: Any) -> Modelfile:
        """The Modelfile this manifest would be created from, FROM its blob (as ollama shows)."""
        return Modelfile(
            from_=str(blob_path(self.model)),
            parameters=dict(self.parameters),
            template=self.template,
            system=self.system,
            adapters=[str(blob_path(a)) for a in self.adapters],
            license=list(self.license),
            messages=[dict(m) for m in self.messages],
        )
