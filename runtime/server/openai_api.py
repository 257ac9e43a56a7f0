"""The OpenAI-compatible endpoints: POST /v1/chat/completions, POST /v1/completions,
GET /v1/models, GET /v1/models/{id}. Streams are Server-Sent Events (`data: {json}` lines, then `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quant.errors import ContextLengthError, InternalError, ModelNotFoundError, TandemError
from runtime.engine.grammar import check_grammar
from runtime.sampling_params import SamplingParams
from runtime.server.chat_output import ChatOutput
from runtime.server.chat_setup import ChatSetup, chat_setup
from runtime.server.choice import Choice
from runtime.server.errors import RequestFieldError, openai_error, openai_error_body, status_of
from runtime.server.limits import check_prompt_chars
from runtime.server.openai_request import OpenAIRequest, parse_chat, parse_completion
from runtime.server.openai_shape import ChatShape, CompletionShape, Shape
from runtime.server.state import ServerState, read_json, server_state
from runtime.server.stream import RequestStream

log = logging.getLogger(__name__)
router = APIRouter()
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = server_state(request)
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "tandem"}
        for name, created in state.model_names()
    ]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}")
async def get_model(request: Request, model: str) -> Response:
    for name, created in server_state(request).model_names():
        if model in (name, name.removesuffix(":latest")):
            return JSONResponse(
                {"id": name, "object": "model", "created": created, "owned_by": "tandem"}
            )
    return openai_error(ModelNotFoundError(f"model {model[:200]!r} not found (GET /v1/models)"))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _serve(request, "completions")


async def _serve(request: Request, kind: str) -> Response:
    state, arrived = server_state(request), time.perf_counter()
    endpoint = f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}"
    try:
        body = await read_json(request)
        req = parse_chat(body) if kind == "chat" else parse_completion(body)
        stream, shape, setup = await _start(state, req, kind, arrived)
    except TandemError as err:
        state.metrics.count_request(endpoint, status_of(err))
        return openai_error(err)
    state.metrics.count_request(endpoint, 200)
    reply = _Reply(req, shape, stream, kind, setup)
    if req.stream:
        return StreamingResponse(
            reply.sse(request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    return await reply.whole(request)


async def _start(
    state: ServerState, req: OpenAIRequest, kind: str, arrived: float
) -> tuple[RequestStream, Shape, ChatSetup | None]:
    served, _ = await state.registry.get(req.model)
    stream = RequestStream(state.registry, served, state.metrics, arrived, whole=not req.stream)
    try:
        lm = served.lm
        chars, tokens = _prompt_size(req)
        check_prompt_chars(chars, tokens, served.num_ctx, served.max_token_chars)
        setup = None
        if kind == "chat":
            assert req.messages is not None  # parse_chat sets them
            params = req.params(lm, None)
            setup = await asyncio.to_thread(
                chat_setup, lm, req.messages, req.tools, req.template_kwargs, params, served.num_ctx
            )
            ids, params = setup.ids, setup.params
        else:
            assert req.prompt is not None  # parse_completion sets it
            ids = await asyncio.to_thread(_completion_ids, lm, req.prompt, served.num_ctx)
            params = req.params(lm, COMPLETIONS_DEFAULT_MAX_TOKENS)
            if params.grammar is not None:  # a grammar that cannot be enforced: 400 now
                await asyncio.to_thread(check_grammar, lm.tokenizer, params.grammar)
        _check_fits(ids, params, served.num_ctx)
        stream.submit(ids, params)
    except BaseException:
        stream.close()
        raise
    shape_cls = ChatShape if kind == "chat" else CompletionShape
    return stream, shape_cls(lm.tokenizer, req.want_logprobs), setup


def _prompt_size(req: OpenAIRequest) -> tuple[int, int]:
    """(characters, token ids) of the request's own prompt, before any template."""
    if req.messages is not None:
        return sum(len(m["content"]) for m in req.messages), 0  # (tools: bounded by the body)
    if isinstance(req.prompt, str):
        return len(req.prompt), 0
    return 0, len(req.prompt or [])


def _completion_ids(lm, prompt: str | list[int], num_ctx: int) -> list[int]:
    if isinstance(prompt, str):  # tokenizing stops once the prompt cannot fit num_ctx
        return lm.tokenizer.encode(prompt, add_special=True, max_tokens=num_ctx)
    bad = [t for t in prompt if t >= lm.tokenizer.vocab_size]
    if bad:
        raise RequestFieldError(
            "prompt",
            f"token id {bad[0]} is outside the vocabulary (0..{lm.tokenizer.vocab_size - 1})",
        )
    return prompt


def _check_fits(ids: list[int], params: SamplingParams, num_ctx: int) -> None:
    """OpenAI's rule: the prompt plus max_tokens must fit the context."""
    need = len(ids) + (params.max_tokens or 1)
    if need > num_ctx:
        raise ContextLengthError(
            f"this model's context holds {num_ctx} tokens, but the prompt has {len(ids)} "
            f"and max_tokens asks for {params.max_tokens or 1} more; shorten the prompt "
            f"or lower max_tokens"
        )


class _Reply:
    """One request's answer, whole or streamed."""

    def __init__(
        self,
        req: OpenAIRequest,
        shape: Shape,
        stream: RequestStream,
        kind: str,
        setup: ChatSetup | None = None,
    ) -> None:
        self.req, self.shape, self.stream, self.kind = req, shape, stream, kind
        self.setup = setup
        self.id = shape.id_prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices: dict[int, Choice] = {}
        self.outputs: dict[int, ChatOutput] = {}  # chat: reasoning / content / tool calls

    def _choice(self, index: int) -> Choice:
        if index not in self.choices and self.setup is not None:
            output = self.setup.output()  # None: nothing to split (no tools, no reasoning)
            if output is not None:
                self.outputs[index] = output
        return self.choices.setdefault(index, Choice(index))

    def usage(self) -> dict:
        done = sum(len(c.token_ids) for c in self.choices.values())
        return {
            "prompt_tokens": self.stream.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.stream.prompt_tokens + done,
        }

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        out = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
        }
        if self.kind == "chat":
            out["system_fingerprint"] = None
        return out

    async def whole(self, request: Request) -> Response:
        async for event in self.stream.events(request.is_disconnected):
            if event.error is not None:
                self.stream.close()
                return openai_error(event.error)
            assert event.delta is not None  # an Event carries a delta or an error
            self._choice(event.index).add(event.delta, self.req.want_logprobs)
        for i, out in self.outputs.items():  # split the whole text as a stream would
            c = self.choices[i]
            reasoning, content = out.push(c.text)
            r2, c2, c.tool_calls = out.finish()
            c.reasoning, c.content = reasoning + r2, content + c2
        choices = [self.shape.choice(self.choices[i]) for i in sorted(self.choices)]
        body = self._envelope(self.shape.object, choices)
        body["usage"] = self.usage()
        return JSONResponse(body)

    async def sse(self, request: Request) -> AsyncIterator[str | bytes]:
        """The stream's events, each event's chunks in one write (one send, not several)."""
        for index in range(self.stream_n()):
            opening = self.shape.opening(index)
            if opening is not None:
                yield self._chunk([opening])
        try:
            async for event in self.stream.events(request.is_disconnected):
                if event.error is not None:
                    yield _data(openai_error_body(event.error))
                    continue
                chunks = self._event_chunks(event)
                if chunks:
                    yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except Exception as err:  # the status line is sent: say so in the stream, end it
            log.exception("stream %s failed", self.id)
            yield _data(openai_error_body(InternalError(f"internal error ({type(err).__name__})")))
        tail = b""
        if self.req.include_usage:
            body = self._envelope(self.shape.chunk_object, [])
            body["usage"] = self.usage()
            tail = _data(body)
        yield tail + b"data: [DONE]\n\n"

    def stream_n(self) -> int:
        return self.stream.samples

    def _event_chunks(self, event) -> list[bytes]:
        choice = self._choice(event.index)
        added = choice.add(event.delta, self.req.want_logprobs)
        out = []
        parser = self.outputs.get(event.index)
        if parser is None:
            if event.delta.text or added:
                out.append(self._chunk([self.shape.piece(choice, event.delta.text, added)]))
        else:
            reasoning, content = parser.push(event.delta.text)
            calls = []
            if choice.finish_reason is not None:
                r2, c2, calls = parser.finish()
                reasoning, content = reasoning + r2, content + c2
                choice.tool_calls = calls
            assert isinstance(self.shape, ChatShape)  # outputs exist for chat only
            for piece in self.shape.pieces(choice, reasoning, content, calls, added):
                out.append(self._chunk([piece]))
        if choice.finish_reason is not None:
            out.append(self._chunk([self.shape.ending(choice)]))
        return out

    def _chunk(self, choices: list[dict]) -> bytes:
        body = self._envelope(self.shape.chunk_object, choices)
        if self.req.include_usage:
            body["usage"] = None
        return _data(body)


def _data(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS) + b"\n\n"
