"""StopMatcher: finds stop strings in streamed text without ever emitting them.

Text arrives in pieces (one decoded token at a time). The matcher emits what can no longer be
part of a stop string and holds back the longest tail that could still begin one. Generation
stops at the first stop string to be *completed*; when several complete at the same place,
the longest (earliest-starting) one is the match. Because that rule looks only at text seen
so far, the output is the same however the text is split into pieces.

Cost per piece does not grow with the number of stop strings: the held-back text never holds
a whole stop string, so a match must end inside the new piece, and for each end position only
the distinct stop lengths are looked up in a set; the held-back tail (shorter than the longest
stop) is found by binary search in the sorted stops. Many stop strings cost O(log S) per piece,
not O(S). The engine refuses more than MAX_STOPS strings or any longer than MAX_STOP_CHARS.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from quant.errors import InvalidParameterError, TooManyStopsError

MAX_STOPS = 1024  # stop strings per request the engine accepts (the API caps lower)
MAX_STOP_CHARS = 1024  # characters per stop string


class StopMatcher:
    """Streams text through, cutting it before the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = [stops]
        if len(stops) > MAX_STOPS:
            raise TooManyStopsError(
                f"{len(stops)} stop strings given; at most {MAX_STOPS} are accepted"
            )
        for s in stops:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError(f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise TooManyStopsError(
                    f"a stop string of {len(s)} characters given; "
                    f"at most {MAX_STOP_CHARS} are accepted"
                )
        self._stops = frozenset(stops)
        self._sorted = sorted(self._stops)  # for prefix lookups by binary search
        self._lengths = sorted({len(s) for s in self._stops}, reverse=True)  # longest first
        self._longest = self._lengths[0] if self._lengths else 0
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
        if not self._stops:
            return text, False
        buf = self._held + text
        hit = self._first_match(buf, len(self._held))
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

    def _first_match(self, buf: str, new_from: int) -> tuple[int, str] | None:
        """(start, stop) of the match that ends first; at equal ends, the longest. Only ends
        after `new_from` are possible: the held-back text before it holds no stop string."""
        for end in range(new_from + 1, len(buf) + 1):
            for n in self._lengths:  # longest first: at equal ends the longest wins
                if n <= end and buf[end - n : end] in self._stops:
                    return end - n, buf[end - n : end]
        return None

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop string."""
        stops = self._sorted
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            # the first stop >= tail starts with tail iff any stop does
            i = bisect_left(stops, tail)
            if i < len(stops) and stops[i].startswith(tail) and len(stops[i]) > k:
                return k
            # a stop equal to tail (not a proper prefix) sorts first; the next may extend it
            if i + 1 < len(stops) and stops[i] == tail and stops[i + 1].startswith(tail):
                return k
        return 0
