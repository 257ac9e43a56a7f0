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
    """Only a bounded tail of the output is kept (a word's length, or while the reasoning is
    open a close marker's), so a long output costs no more per token than a short one."""

    def __init__(
        self,
        triggers: tuple[Trigger, ...],
        tokens: frozenset[int] = frozenset(),
        quiet: Quiet | None = None,
    ) -> None:
        self._words = [t.word for t in triggers if not t.at_start]
        self._starts = [t.word for t in triggers if t.at_start]  # while the start may be one
        self._tokens = tokens
        self._keep = max((len(w) for w in self._words), default=1) - 1
        self._quiet = quiet
        self._phase = "watch" if quiet is None else ("inside" if quiet.inside else "before")
        self._tail = ""  # the output not yet ruled out
        self._base = 0  # the tail's offset in the output
        self._from = 0  # where watching began (after the reasoning)
        self.fired_at: int | None = None  # the trigger's offset in the output, once found

    def push(self, token: int, text: str) -> str | None:
        """Take one token and its decoded text; once the trigger is in the output, the output
        from the trigger's start on (returned once: after that the grammar takes over)."""
        if self.fired_at is not None:
            return None
        start = self._base + len(self._tail)
        self._tail += text
        if self._phase != "watch" and not self._past_reasoning():
            return None
        if token in self._tokens and start >= self._from:
            return self._fire(start)
        at = self._at_start()
        if at is None:
            at = self._find_word()
        return None if at is None else self._fire(at)

    def _fire(self, at: int) -> str:
        self.fired_at = at
        return self._tail[at - self._base :]

    def _cut(self, upto: int) -> None:
        """Forget the tail before offset `upto` of the output."""
        self._tail = self._tail[upto - self._base :]
        self._base = upto

    def _past_reasoning(self) -> bool:
        """Whether the reasoning is over (or never opened); watching begins after it."""
        q = self._quiet
        assert q is not None
        if self._phase == "before":
            stripped = self._tail.lstrip()
            if not stripped.startswith(q.open):
                if q.open.startswith(stripped):
                    return False  # blank, or a prefix of the open marker: not known yet
                self._phase = "watch"
                return True
            self._phase = "inside"
        close = self._tail.find(q.close)
        if close < 0:
            self._cut(max(self._base, self._base + len(self._tail) - len(q.close) + 1))
            return False
        self._cut(self._base + close + len(q.close))
        self._phase, self._from = "watch", self._base
        return True

    def _at_start(self) -> int | None:
        """The offset of an at-start trigger; dropped once the output's first text cannot
        be one (the tail is kept from where watching began until then)."""
        if not self._starts:
            return None
        head = self._tail.lstrip()
        for word in self._starts:
            if head.startswith(word):
                return self._from + len(self._tail) - len(head)
        self._starts = [w for w in self._starts if w.startswith(head)]
        return None

    def _find_word(self) -> int | None:
        """The earliest trigger word in the tail; then the tail is cut to a word's length
        less one (a word split over this token and the next is still found)."""
        found = [i for w in self._words if (i := self._tail.find(w)) >= 0]
        if found:
            return self._base + min(found)
        if not self._starts:
            self._cut(max(self._base, self._base + len(self._tail) - self._keep))
        return None
