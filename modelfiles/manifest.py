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
when they would run the same model the same way. `from_json` checks every field's type (a
digest is sha256:<64 hex>, a parameter one tandem knows), so a damaged or hand-edited file is
reported as damaged when read, never later as a crash or a path outside the blob store.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from modelfiles.modelfile import Modelfile
from modelfiles.parameters import PARAMETERS
from quant.errors import ModelNotFoundError

SCHEMA = 1
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "size": (int,)}


def damaged(where: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"the manifest {where} is damaged ({why}); remove it with `tandem rm` "
        "and create the model again"
    )


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
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """The manifest in `text`; ModelNotFoundError saying it is damaged, and why."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("it is not a JSON object")
            if data.pop("schema", None) != SCHEMA:
                raise ValueError(f"schema is not {SCHEMA}")
            unknown = set(data) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"unknown fields {ascii(sorted(unknown))[:200]}")
            data["model"] = _layer(data.get("model"))
            data["adapters"] = [_layer(a) for a in _typed(data, "adapters", list, [])]
            _check_parameters(_typed(data, "parameters", dict, {}))
            for key in ("template", "system", "parent", "quantization"):
                _typed(data, key, (str, type(None)), None)
            if created := _typed(data, "created_at", str, ""):
                datetime.fromisoformat(created)  # ValueError when it is not a time
            if not all(isinstance(x, str) for x in _typed(data, "license", list, [])):
                raise ValueError("license is not a list of strings")
            for m in _typed(data, "messages", list, []):
                if not isinstance(m, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in m.items()
                ):
                    raise ValueError("messages is not a list of {role, content} strings")
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
            raise damaged(where, str(err)) from None

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


def _typed(data: dict, key: str, types, default):
    value = data.get(key, default)
    if not isinstance(value, types):
        raise ValueError(f"{key} is a {type(value).__name__}")
    return value


def _layer(value) -> Layer:
    if not isinstance(value, dict) or set(value) != {"digest", "size"}:
        raise ValueError("a layer is not {digest, size}")
    digest, size = value["digest"], value["size"]
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"a layer's digest {ascii(digest)[:80]} is not sha256:<64 hex digits>")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"a layer's size {ascii(size)[:40]} is not a byte count")
    return Layer(digest, size)


def _check_parameters(parameters: dict) -> None:
    for key, value in parameters.items():
        spec = PARAMETERS.get(key)
        if spec is None:
            raise ValueError(f"unknown parameter {ascii(key)[:80]}")
        values = value if spec.repeated else [value]
        if spec.repeated and not isinstance(value, list):
            raise ValueError(f"parameter {key} is not a list")
        types = _KINDS.get(spec.kind, (str,))
        for v in values:
            if not isinstance(v, types) or (spec.kind != "bool" and isinstance(v, bool)):
                raise ValueError(f"parameter {key} has a {type(v).__name__} value")
