"""LocalModel: a GGUF another tool keeps on this machine (ollama, the Hugging Face cache, LM
Studio), used where it lies: tandem reads it in place and never copies, links or writes there.

Names are matched case-insensitively, as ollama matches them: `name` (lowercase `NAME:TAG`)
is how `tandem list` shows the model and how `tandem run` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OLLAMA, HUGGINGFACE, LMSTUDIO = "ollama", "huggingface", "lmstudio"
SOURCES = (OLLAMA, HUGGINGFACE, LMSTUDIO)  # the lookup order (after tandem's own store)


@dataclass(frozen=True)
class LocalModel:
    name: str  # lowercase NAME:TAG
    source: str  # OLLAMA | HUGGINGFACE | LMSTUDIO
    path: Path  # the GGUF, in the other tool's folder
    size: int  # bytes of the GGUF (and adapters)
    mtime: float
    id: str = ""  # ollama's ID, or the start of the blob's sha256 ("" when unknown)
    layers: tuple[tuple[str, Path], ...] = ()  # ollama's other layers: (media type, blob)


@dataclass
class Settings:
    """What a model's other layers set (ollama's template, params, system... layers)."""

    adapters: list[Path] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    license: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)


def split_name(text: str) -> tuple[str, str | None]:
    """`a/b:tag` as ("a/b", "tag"), lowercase; the tag None when not given (a colon before the
    last `/` is not a tag: `host:port/name`)."""
    text = text.strip().lower()
    head, slash, last = text.rpartition("/")
    last, colon, tag = last.partition(":")
    return head + slash + last, (tag if colon and tag else None)
