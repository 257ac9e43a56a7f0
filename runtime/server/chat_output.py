"""ChatOutput: one sample's generated text split, as it streams, into the model's reasoning
(`<think>…</think>` and the like), its content, and its tool calls.

    out = ChatOutput(thinking=Thinking("<think>", "</think>", inside=True), tools=(fmt, tools))
    reasoning, content = out.push(piece)          # per delta; either may be ""
    reasoning, content, calls = out.finish()      # at the end: what was held back, the calls

Reasoning: before the open marker (or from the start when the prompt already opened it, as
DeepSeek-R1's and Qwen3's templates do) text up to the close marker is reasoning; partial
markers are held back. Tool calls: content is held back from where a call may begin (the
family's opening text, or a prefix of it at the end of the text); at the end the held text is
parsed, and what is not a call is released as content.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.server.tool_calls import ToolCall, ToolFormat

# (open, close) markers of the reasoning families, by a text their templates hold
THINK_MARKERS: list[tuple[str, str]] = [("<think>", "</think>"), ("<seed:think>", "</seed:think>")]


@dataclass
class Thinking:
    open: str
    close: str
    inside: bool  # the prompt ends inside the reasoning (the template opened it)


def thinking_for(template_source: str, prompt_tail: str, enabled: bool) -> Thinking | None:
    """The reasoning markers of a template, or None when it has none or thinking is off and
    the prompt did not open a reasoning block."""
    for open_, close in THINK_MARKERS:
        if close in template_source:
            tail = prompt_tail.rstrip()
            inside = tail.endswith(open_)
            if not enabled and not inside:
                return None
            return Thinking(open_, close, inside)
    return None


def _partial(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ChatOutput:
    def __init__(
        self,
        thinking: Thinking | None = None,
        tools: tuple[ToolFormat, list[dict]] | None = None,
    ) -> None:
        self.thinking = thinking
        self.tools = tools
        self._state = (
            "content" if thinking is None else ("thinking" if thinking.inside else "before")
        )
        self._buf = ""  # reasoning-side text not yet decided
        self._content = ""  # all content so far
        self._sent = 0  # content characters already released

    def push(self, text: str) -> tuple[str, str]:
        reasoning, content = self._split(text)
        if not self._content and self.thinking is not None:
            content = content.lstrip()  # the blank line after the reasoning
        self._content += content
        return reasoning, self._release()

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        reasoning = ""
        if self._state == "before":
            self._content += self._buf
        elif self._state == "thinking":
            reasoning = self._buf
        self._buf = ""
        self._state = "content"
        calls: list[ToolCall] = []
        text = self._content
        if self.tools is not None:
            text, calls = self.tools[0].parse(self._content, self.tools[1])
        rest = text[self._sent :] if calls else self._content[self._sent :]
        self._sent = len(self._content)
        return reasoning, rest, calls

    def _split(self, text: str) -> tuple[str, str]:
        t = self.thinking
        if t is None or self._state == "content":
            return "", text
        buf = self._buf + text
        if self._state == "before":
            stripped = buf.lstrip()
            if stripped.startswith(t.open):
                self._state, buf = "thinking", stripped[len(t.open) :]
            elif t.open.startswith(stripped):
                self._buf = buf
                return "", ""
            else:
                self._state, self._buf = "content", ""
                return "", buf
        at = buf.find(t.close)
        if at >= 0:
            self._state, self._buf = "content", ""
            return buf[:at], buf[at + len(t.close) :].lstrip()
        keep = _partial(buf, t.close)
        self._buf = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], ""

    def _release(self) -> str:
        """Content that cannot be part of a tool call."""
        if self.tools is None:
            out, self._sent = self._content[self._sent :], len(self._content)
            return out
        fmt, text = self.tools[0], self._content
        start = fmt.start_of_calls(text)
        if start is None:
            if (fmt.name == "llama3" and not text.strip()) or fmt.may_lead(text):
                start = 0
            else:
                start = len(text) - max((_partial(text, s) for s in fmt.starts), default=0)
        start = max(start, self._sent)
        out, self._sent = text[self._sent : start], start
        return out
