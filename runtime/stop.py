"""StopMatcher: finds stop strings in streamed text without ever emitting them.

Text arrives in pieces (one decoded token at a time). The matcher emits what can no longer be
part of a stop string and holds back the longest tail that could still begin one. Generation
stops at the first stop string to be *completed*; when several complete at the same place,
the longest (earliest-starting) one is the match. Because that rule looks only at text seen
so far, the output is the same however the text is split into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.errors import InvalidParameterError


class StopMatcher:
    """Streams text through, cutting it before the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = [stops]
        for s in stops:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError(f"stop strings must be non-empty strings, got {s!r}")
        self._stops = tuple(dict.fromkeys(stops))
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been hit."""
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that was hit, if any."""
        return self._matched

    def push(self, text: str) -> tuple[str, bool]:
        """Add `text`; return the text now safe to emit and whether a stop string was hit."""
        if self.stopped:
            return "", True
        buf = self._held + text
        hit = self._first_match(buf)
        if hit is not None:
            start, stop = hit
            self._held, self._matched = "", stop
            return buf[:start], True
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At the end of generation (no stop hit): release what was held back."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        """(start, stop) of the match that ends first; at equal ends, the longest."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = buf.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key < best:
                best = key
        return None if best is None else (best[1], best[2])

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                return k
        return 0
