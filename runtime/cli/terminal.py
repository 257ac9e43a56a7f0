"""Text bound for a terminal, made inert: what a model name, a manifest or a server's answer
holds is shown, never obeyed.

Control characters (C0, DEL, C1 — ESC starts every terminal escape sequence), Unicode bidi
overrides and isolates (which reorder what the eye sees) and line/paragraph separators are
written as visible escapes (`\\x1b`, `\\u202e`). `keep` names the characters left alone (a
multi-line text keeps its newlines and tabs).
"""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, keep: str = "") -> str:
    """`text` (str() of it) with every unsafe character but those in `keep` escaped."""
    return _UNSAFE.sub(lambda m: m[0] if m[0] in keep else _escape(m[0]), str(text))


def printable_lines(text: str) -> str:
    """A multi-line text for a terminal: newlines and tabs kept, the rest escaped."""
    return printable(text, keep="\n\t")
