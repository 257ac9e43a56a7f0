"""The JSON shapes of OpenAI responses: chat.completion(.chunk) and text_completion, whole
and streamed, built from Choices. One class per endpoint, same methods."""

from __future__ import annotations

from loaders.tokenizer import Tokenizer
from runtime.server.choice import Choice, TokenLogprob, chat_logprobs, completion_logprobs
from runtime.server.tool_calls import ToolCall


class ChatShape:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, tok: Tokenizer, want_logprobs: bool) -> None:
        self.tok, self.want_logprobs = tok, want_logprobs

    def choice(self, c: Choice) -> dict:
        message: dict = {"role": "assistant", "content": c.text, "refusal": None}
        if c.content is not None:
            message["content"] = c.content if c.content or not c.tool_calls else None
            if c.reasoning:
                message["reasoning_content"] = c.reasoning
            if c.tool_calls:
                message["tool_calls"] = [t.openai() for t in c.tool_calls]
        return {
            "index": c.index,
            "message": message,
            "logprobs": chat_logprobs(self.tok, c.logprobs) if self.want_logprobs else None,
            "finish_reason": c.finish,
        }

    def pieces(
        self,
        c: Choice,
        reasoning: str,
        content: str,
        calls: list[ToolCall],
        added: list[TokenLogprob],
    ) -> list[dict]:
        """The chunks of one step of a split chat output (reasoning, content, tool calls)."""
        logprobs = chat_logprobs(self.tok, added) if self.want_logprobs and added else None
        deltas: list[dict] = []
        if reasoning:
            deltas.append({"reasoning_content": reasoning})
        if content or (logprobs and not deltas):
            deltas.append({"content": content})
        if calls:
            deltas.append({"tool_calls": [t.openai(i) for i, t in enumerate(calls)]})
        out = []
        for k, delta in enumerate(deltas):
            piece = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
            if k == 0:
                piece["logprobs"] = logprobs
            out.append(piece)
        return out

    def opening(self, index: int) -> dict | None:
        return {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def piece(self, c: Choice, text: str, added: list[TokenLogprob]) -> dict:
        logprobs = chat_logprobs(self.tok, added) if self.want_logprobs and added else None
        return {
            "index": c.index,
            "delta": {"content": text},
            "logprobs": logprobs,
            "finish_reason": None,
        }

    def ending(self, c: Choice) -> dict:
        return {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish}


class CompletionShape:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, tok: Tokenizer, want_logprobs: bool) -> None:
        self.tok, self.want_logprobs = tok, want_logprobs

    def choice(self, c: Choice) -> dict:
        logprobs = completion_logprobs(self.tok, c.logprobs) if self.want_logprobs else None
        return {
            "index": c.index,
            "text": c.text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }

    def opening(self, index: int) -> dict | None:
        return None

    def piece(self, c: Choice, text: str, added: list[TokenLogprob]) -> dict:
        logprobs = None
        if self.want_logprobs and added:
            before = c.logprobs[: len(c.logprobs) - len(added)]
            offset = sum(
                len(self.tok.piece(e.token_id, special=True).decode("utf-8", "replace"))
                for e in before
            )
            logprobs = completion_logprobs(self.tok, added, offset)
        return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def ending(self, c: Choice) -> dict:
        return {"index": c.index, "text": "", "logprobs": None, "finish_reason": c.finish_reason}


Shape = ChatShape | CompletionShape
