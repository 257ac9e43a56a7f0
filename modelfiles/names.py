"""ModelName: a stored model's `name[:tag]` (tag `latest` when omitted), validated.

Names and tags are case-insensitive (kept lowercase), as ollama treats them: a name is
letters, digits, `_`, `-` and `.` starting with a letter or digit (at most 80 characters);
a tag the same with `_` also allowed first (at most 80). A model pulled from Hugging Face is
named as ollama names it, `hf.co/user/repo` (its tag the quant, e.g. `q4_k_m`); it is stored
under models/manifests/hf.co/user/repo/. A model pulled from an ollama registry keeps ollama's
short form: `name`, `namespace/name`, or `host[:port]/namespace/name` (stored in those folders).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quant.errors import InvalidParameterError

DEFAULT_TAG = "latest"
_PART = r"[a-z0-9][a-z0-9_.-]{0,79}"
_HOST = r"[a-z0-9][a-z0-9.-]{0,252}(?::[0-9]{1,5})?"
_NAME = re.compile(
    r"hf\.co/[a-z0-9][a-z0-9_.-]{0,95}/[a-z0-9][a-z0-9_.-]{0,95}"
    rf"|(?:(?:{_HOST}/)?{_PART}/)?{_PART}"
)
_TAG = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,79}")


@dataclass(frozen=True, order=True)
class ModelName:
    name: str
    tag: str = DEFAULT_TAG

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """`name` or `name:tag`; InvalidParameterError saying what a name may hold."""
        head, slash, last = text.strip().lower().rpartition("/")
        last, _, tag = last.partition(":")  # a colon before the last `/` is a host's port
        name = head + slash + last
        tag = tag or DEFAULT_TAG
        if not _NAME.fullmatch(name) or ".." in name:
            raise InvalidParameterError(
                f"model name {text!r} is not valid: use letters, digits, '_', '-' and '.', "
                "starting with a letter or digit, optionally followed by :tag"
            )
        if not _TAG.fullmatch(tag):
            raise InvalidParameterError(
                f"model tag in {text!r} is not valid: use letters, digits, '_', '-' and '.'"
            )
        return cls(name, tag)

    @classmethod
    def maybe(cls, text: str) -> ModelName | None:
        """The name, or None when `text` cannot be a model name (e.g. it is a path)."""
        try:
            return cls.parse(text)
        except InvalidParameterError:
            return None

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"
