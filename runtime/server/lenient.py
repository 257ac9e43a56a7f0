"""Lenient request fields: what a body may carry beyond the fields a handler reads.

Clients routinely send fields a server does not know (`cache_prompt`, `chat_template_kwargs`,
`skip_special_tokens`, `extra_body` keys merged into the body, llama.cpp web UI settings at
their defaults). Such a field is accepted and ignored, as ollama and vLLM do: it is logged once
per field name for the life of the process, and the response names every field it ignored in
the `X-Tandem-Ignored-Fields` header (comma-separated).

A field that would change the answer in a way tandem cannot honour (a sampler it does not
have, set to a value that is not that sampler's "off"; constrained decoding under another
server's name; beam search) is refused instead: `refuse_unhonoured` raises a RequestFieldError
naming it, so a client never silently gets something other than what it asked for.

The Guard opens a per-request record (`begin`) and reads it when the response starts.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable
from typing import Any

from runtime.server.errors import RequestFieldError

log = logging.getLogger(__name__)
HEADER = "x-tandem-ignored-fields"

_record: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "tandem_ignored_fields", default=None
)
_logged: set[str] = set()


def _absent(v: Any) -> bool:
    return v is None


def _at(*off: Any) -> Callable[[Any], bool]:
    """None or one of `off` (a bool matches only a bool: True is not 1 here)."""
    return lambda v: (
        v is None or any(v == o and isinstance(v, bool) == isinstance(o, bool) for o in off)
    )


# unknown field -> the values at which it changes nothing (anything else is refused)
UNHONOURED: dict[str, Callable[[Any], bool]] = {
    # constrained decoding under other servers' names
    "guided_json": _absent,
    "guided_regex": _absent,
    "guided_choice": _absent,
    "guided_grammar": _absent,
    "guided_decoding": _absent,
    "json_schema": _absent,
    "grammar": _absent,
    "structured_outputs": _absent,
    "logits_processors": _absent,
    "allowed_token_ids": _absent,
    "bad_words": _absent,
    "prompt_logprobs": _absent,
    "truncate_prompt_tokens": _absent,
    # samplers tandem does not have, at their "off" values
    "min_tokens": _at(0),
    "typical_p": _at(1),
    "tfs_z": _at(1),
    "mirostat": _at(0),
    "dry_multiplier": _at(0),
    "xtc_probability": _at(0),
    "dynatemp_range": _at(0),
    "top_n_sigma": _at(-1, 0),
    "repeat_penalty": _at(1),
    "n_probs": _at(0),
    # decoding strategies
    "use_beam_search": _at(False),
    "length_penalty": _at(1),
    "include_stop_str_in_output": _at(False),
    "add_generation_prompt": _at(True),
    "continue_final_message": _at(False),
    "echo": _at(False),
}


def begin() -> list[str]:
    """Open this request's record of ignored fields (called by the Guard)."""
    names: list[str] = []
    _record.set(names)
    return names


def refuse_unhonoured(body: dict, unknown: Iterable[str], prefix: str = "") -> None:
    """RequestFieldError for the first unknown field that would change the answer."""
    for name in sorted(unknown):
        accepts = UNHONOURED.get(name)
        if accepts is not None and not accepts(body[name]):
            raise RequestFieldError(
                prefix + name,
                f"{prefix}{name}={body[name]!r} would change the answer in a way tandem "
                f"cannot honour; leave {prefix}{name} out",
            )


def ignore(names: Iterable[str], prefix: str = "") -> None:
    """Accept `names` (fields no handler reads): log each once, list them in the header."""
    record = _record.get()
    for name in sorted(names):
        full = prefix + name
        if full not in _logged:
            _logged.add(full)
            log.info("ignoring request field %r (tandem does not use it)", full[:100])
        if record is not None and full not in record:
            record.append(full)


def lenient(body: dict, known: set[str], prefix: str = "") -> None:
    """Refuse unknown fields of `body` that would change the answer; ignore the others."""
    unknown = set(body) - known
    if unknown:
        refuse_unhonoured(body, unknown, prefix)
        ignore(unknown, prefix)


def header_value(names: list[str]) -> bytes:
    """The header's value: the names, printable ASCII only, at most 1000 bytes."""
    text = ", ".join(n for n in names if n.isascii() and n.isprintable())
    return text[:1000].encode("ascii")
