"""Choice: what one sample of a request has produced so far — text, token count, finish
reason, timings, logprobs — built from engine Deltas, with the two OpenAI logprob shapes.

Chat shape (per token):   {"token", "logprob", "bytes", "top_logprobs": [{"token", ...}]}
Completions shape:        {"tokens": [...], "token_logprobs": [...],
                           "top_logprobs": [{token: logprob}], "text_offset": [...]}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loaders.tokenizer import Tokenizer
from runtime.engine.sequence import Delta, Timings
from runtime.server.tool_calls import ToolCall


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # chat: the text split by ChatOutput (None: not split; `text` is the content)
    reasoning: str = ""
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, delta: Delta, want_logprobs: bool) -> list[TokenLogprob]:
        """Take one Delta; returns the logprob entries it added (for a stream chunk)."""
        self.text += delta.text
        added = []
        if delta.token_id is not None:
            self.token_ids.append(delta.token_id)
            if want_logprobs and delta.logprob is not None:
                added.append(TokenLogprob(delta.token_id, delta.logprob, list(delta.top)))
                self.logprobs.extend(added)
        if delta.finish_reason is not None:
            self.finish_reason, self.timings = delta.finish_reason, delta.timings
        return added

    @property
    def finish(self) -> str | None:
        """The finish reason as the API reports it: "tool_calls" when the sample called tools."""
        return (
            "tool_calls" if self.tool_calls and self.finish_reason == "stop" else self.finish_reason
        )


def _piece(tok: Tokenizer, token_id: int) -> bytes:
    return tok.piece(token_id, special=True)


def _entry(tok: Tokenizer, token_id: int, logprob: float) -> dict:
    raw = _piece(tok, token_id)
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tok: Tokenizer, entries: list[TokenLogprob]) -> dict:
    content = []
    for e in entries:
        item = _entry(tok, e.token_id, e.logprob)
        item["top_logprobs"] = [_entry(tok, t, lp) for t, lp in e.top]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(tok: Tokenizer, entries: list[TokenLogprob], offset: int = 0) -> dict:
    """`offset`: characters of completion text before the first of these tokens."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for e in entries:
        text = _piece(tok, e.token_id).decode("utf-8", "replace")
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(
            {_piece(tok, t).decode("utf-8", "replace"): lp for t, lp in e.top}
        )
        out["text_offset"].append(offset)
        offset += len(text)
    return out
