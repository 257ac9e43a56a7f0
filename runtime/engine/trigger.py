"""TriggerMatcher: watches a sample's output for the text that starts a lazy grammar (a tool
call's opening, such as `<tool_call>` or `[TOOL_CALLS]`), as llama.cpp's lazy grammars do.

    watch = TriggerMatcher(lazy)                   # lazy: a LazyGrammar (its triggers)
    rest = watch.push(token_id, text)              # per token: None, or the output from the
                                                   # trigger's start on (for the grammar)

The decoded text is searched, so a trigger split over several tokens (`<`, `tool`, `_call>`)
is found, and the text before it (content, or a token's piece before the trigger) is the
model's own and stays unconstrained. A trigger token (a control token that spells the word)
fires on its id alone, whatever the detokenizer shows. A trigger `at_start` counts only at
the start of the output (after blanks): Llama 3.x's bare `{"name"`. Inside the reasoning
(`quiet`: the span between its markers) nothing fires: a model thinking about a call has not
made one. Until it fires, nothing here touches the logits (no mask, no check).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Trigger:
    """A text that starts the grammar: found anywhere in the output, or (`at_start`) only
    as the first text of the output after blanks."""

    word: str
    at_start: bool = False


@dataclass(frozen=True)
class Quiet:
    """The reasoning span where triggers are ignored: from `open` (or from the output's start
    when the prompt opened it, `inside`) to `close`."""

    open: str
    close: str
    inside: bool


class TriggerMatcher:
    def __init__(
        self,
        triggers: tuple[Trigger, ...],
        tokens: frozenset[int] = frozenset(),
        quiet: Quiet | None = None,
    ) -> None:
        self._words = [t.word for t in triggers if not t.at_start]
        self._starts = [t.word for t in triggers if t.at_start]
        self._tokens = tokens
        self._longest = max((len(w) for w in self._words), default=1)
        self._quiet = quiet
        self._text = ""  # the output so far (decoded)
        # where watching begins: None while the reasoning is open or may still open
        self._from: int | None = None if quiet is not None else 0
        self._inside = quiet is not None and quiet.inside
        self._scanned = 0  # words were searched up to here (a window of a word's length back)
        self.fired_at: int | None = None  # the trigger's offset in the output, once found

    def push(self, token: int, text: str) -> str | None:
        """Take one token and its decoded text; once the trigger is in the output, the output
        from the trigger's start on (returned once: after that the grammar takes over)."""
        if self.fired_at is not None:
            return None
        start = len(self._text)
        self._text += text
        if self._from is None and not self._find_watch_start():
            return None
        assert self._from is not None
        if token in self._tokens and start >= self._from:
            return self._fire(start)
        at = self._at_start()
        if at is None:
            at = self._find_word()
        return None if at is None else self._fire(at)

    def _fire(self, at: int) -> str:
        self.fired_at = at
        return self._text[at:]

    def _find_watch_start(self) -> bool:
        """Whether the reasoning is over (or never opened); sets where watching begins."""
        q = self._quiet
        assert q is not None
        if not self._inside:
            stripped = self._text.lstrip()
            if stripped.startswith(q.open):
                self._inside = True
            elif q.open.startswith(stripped):
                return False  # blank, or a prefix of the open marker: not known yet
            else:
                self._from = self._scanned = 0
                return True
        close = self._text.find(q.close)
        if close < 0:
            return False
        self._from = self._scanned = close + len(q.close)
        return True

    def _at_start(self) -> int | None:
        """The offset of an at-start trigger; at-start triggers are dropped once the output's
        first text cannot be one."""
        if not self._starts:
            return None
        assert self._from is not None
        body = self._text[self._from :]
        lead = len(body) - len(body.lstrip())
        head = body[lead:]
        for word in self._starts:
            if head.startswith(word):
                return self._from + lead
        self._starts = [w for w in self._starts if w.startswith(head)]
        return None

    def _find_word(self) -> int | None:
        """The earliest trigger word in the text not yet searched (a word split over the
        previous search's end is found: the window starts a word's length back)."""
        assert self._from is not None
        begin = max(self._from, self._scanned - self._longest + 1)
        found = [i for w in self._words if (i := self._text.find(w, begin)) >= 0]
        self._scanned = len(self._text)
        return min(found) if found else None
