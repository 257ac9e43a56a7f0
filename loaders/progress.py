"""A download's progress line on stderr, as ollama draws it: what, percent, a bar, bytes done
of the total, speed and time left; redrawn in place (carriage return) at most ten times a
second, ended with a newline when the download is done or stopped."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 25
_EVERY_S = 0.1


def human(n: float) -> str:
    """Decimal units, one decimal place (ollama's HumanBytes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA ?"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"ETA {minutes}m{secs:02d}s" if minutes else f"ETA {secs}s"


class DownloadBar:
    """Call with the bytes done so far (a resumed download starts above 0: the speed counts
    only what this run received; `now_please` draws even when the last draw was recent);
    `close()` ends the line."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.first: int | None = None
        self.drawn = 0.0
        self.open = True

    def __call__(self, done: int, now_please: bool = False) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = done
        recent = done < self.total and now - self.drawn < _EVERY_S
        if not self.open or (recent and not now_please):
            return
        self.drawn = now
        rate = (done - self.first) / max(now - self.start, 1e-6)
        left = (self.total - done) / rate if rate > 0 else None
        filled = _WIDTH * done // max(self.total, 1)
        self.stream.write(
            f"\r{self.label} {100 * done // max(self.total, 1):3d}% "
            f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {human(done)}/{human(self.total)} "
            f"{human(rate)}/s {_eta(left if done < self.total else 0)}"
        )
        self.stream.flush()
        if done >= self.total:
            self.close()

    def close(self) -> None:
        if self.open and self.drawn:  # a line was drawn: end it
            self.stream.write("\n")
            self.stream.flush()
        self.open = False
