"""The ollama API on the same server: /api/chat and /api/generate (NDJSON streams, or one
object with "stream": false), /api/tags, /api/show, /api/ps, /api/version. Errors are
{"error": "..."} with the status of runtime.server.errors. Durations are nanoseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from importlib import metadata
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loaders.gguf_file import GGUFFile
from modelfiles.resolver import resolve as resolve_spec
from quant.errors import GGUFError, InternalError, TandemError
from runtime.engine.grammar import check_grammar
from runtime.sampling_params import OLLAMA_DEFAULTS
from runtime.server.chat_output import ChatOutput
from runtime.server.chat_setup import chat_setup
from runtime.server.choice import Choice
from runtime.server.errors import RequestFieldError, ollama_error, status_of
from runtime.server.keep_alive import parse_keep_alive
from runtime.server.limits import check_prompt_chars
from runtime.server.ollama_info import local_models, now_iso, ps_entry, show
from runtime.server.ollama_options import fit_context, parse_options
from runtime.server.ollama_prompt import OllamaPrompt, parse_chat, parse_generate
from runtime.server.state import read_json, server_state
from runtime.server.stream import RequestStream

log = logging.getLogger(__name__)
router = APIRouter()


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    return await _serve(request, "chat")


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    return await _serve(request, "generate")


async def _serve(request: Request, kind: str) -> Response:
    state, arrived = server_state(request), time.perf_counter()
    endpoint = f"/api/{kind}"
    try:
        body = await read_json(request)
        req = parse_chat(body) if kind == "chat" else parse_generate(body)
        options = parse_options(body.get("options"))
        keep_alive = (
            None if body.get("keep_alive") is None else parse_keep_alive(body["keep_alive"])
        )
        if req.load_only and keep_alive == 0:  # ollama's way to unload a model
            await state.registry.unload(req.model)
            state.metrics.count_request(endpoint, 200)
            return JSONResponse(_load_reply(req, kind, "unload"))
        served, load_seconds = await state.registry.get(req.model, keep_alive)
        stream = RequestStream(state.registry, served, state.metrics, arrived, whole=not req.stream)
        try:
            if req.load_only:
                stream.close()
                state.metrics.count_request(endpoint, 200)
                return JSONResponse(_load_reply(req, kind, "load"))
            chars, tokens = req.size()
            check_prompt_chars(chars, tokens, served.num_ctx, served.max_token_chars)
            params = options.params(served.lm.sampling_defaults(OLLAMA_DEFAULTS), served.lm.options)
            params = dataclasses.replace(params, grammar=req.grammar)
            setup = None
            if kind == "chat":
                kwargs = {} if req.think is None else {"enable_thinking": req.think}
                setup = await asyncio.to_thread(
                    chat_setup, served.lm, req.messages, req.tools, kwargs, params, served.num_ctx
                )
                ids, params = setup.ids, setup.params
            else:
                ids = await asyncio.to_thread(req.prompt_ids, served.lm, served.num_ctx)
                if params.grammar is not None:
                    await asyncio.to_thread(check_grammar, served.lm.tokenizer, params.grammar)
            params = fit_context(params, len(ids), options.num_ctx, served.num_ctx)
            stream.submit(ids, params)
        except BaseException:
            stream.close()
            raise
    except TandemError as err:
        state.metrics.count_request(endpoint, status_of(err))
        return ollama_error(err)
    state.metrics.count_request(endpoint, 200)
    reply = _Reply(req, kind, stream, ids, arrived, load_seconds)
    reply.output = setup.output() if setup is not None else None
    if req.stream:
        return StreamingResponse(reply.ndjson(request), media_type="application/x-ndjson")
    return await reply.whole(request)


def _load_reply(req: OllamaPrompt, kind: str, reason: str) -> dict:
    """ollama's answer to a request without a prompt: the model is loaded, or unloaded
    (keep_alive 0)."""
    out: dict[str, Any] = {"model": req.model, "created_at": now_iso()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason=reason)
    return out


class _Reply:
    def __init__(
        self,
        req: OllamaPrompt,
        kind: str,
        stream: RequestStream,
        ids: list[int],
        arrived: float,
        load_seconds: float,
    ) -> None:
        self.req, self.kind, self.stream, self.ids = req, kind, stream, ids
        self.arrived, self.load_seconds = arrived, load_seconds
        self.choice = Choice(0)
        self.output: ChatOutput | None = None  # chat: splits reasoning and tool calls out

    def _piece(self, text: str, done: bool, thinking: str = "", calls=()) -> dict:
        out: dict[str, Any] = {"model": self.req.model, "created_at": now_iso()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            out["message"] = message
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [c.ollama() for c in calls]
        else:
            out["response"] = text
        out["done"] = done
        return out

    def _split(self, text: str, last: bool) -> tuple[str, str, list]:
        """(content, thinking, tool calls) of a piece of text, through the chat splitter."""
        if self.output is None:
            return text, "", []
        thinking, content = self.output.push(text)
        calls: list = []
        if last:
            more_thinking, more, calls = self.output.finish()
            thinking, content = thinking + more_thinking, content + more
        return content, thinking, calls

    def _final(self, text: str, thinking: str = "", calls=()) -> dict:
        out = self._piece(text, True, thinking, calls)
        c, ns = self.choice, 1e9
        t = c.timings
        out["done_reason"] = c.finish_reason
        out["total_duration"] = int((time.perf_counter() - self.arrived) * ns)
        out["load_duration"] = int(self.load_seconds * ns)
        out["prompt_eval_count"] = t.prompt_tokens if t else self.stream.prompt_tokens
        out["prompt_eval_duration"] = int(t.prompt_seconds * ns) if t else 0
        out["eval_count"] = t.eval_tokens if t else len(c.token_ids)
        out["eval_duration"] = int(t.eval_seconds * ns) if t else 0
        if self.kind == "generate":
            out["context"] = self.ids + c.token_ids
        return out

    async def whole(self, request: Request) -> Response:
        async for event in self.stream.events(request.is_disconnected):
            if event.error is not None:
                self.stream.close()
                return ollama_error(event.error)
            assert event.delta is not None  # an Event carries a delta or an error
            self.choice.add(event.delta, False)
        return JSONResponse(self._final(*self._split(self.choice.text, True)))

    async def ndjson(self, request: Request) -> AsyncIterator[bytes]:
        try:
            async for event in self.stream.events(request.is_disconnected):
                if event.error is not None:
                    yield _line({"error": str(event.error)})
                    return
                assert event.delta is not None  # an Event carries a delta or an error
                self.choice.add(event.delta, False)
                last = self.choice.finish_reason is not None
                content, thinking, calls = self._split(event.delta.text, last)
                if calls:  # ollama sends the calls in a message of their own before done
                    yield _line(self._piece(content, False, thinking, calls))
                    content, thinking = "", ""
                if last:
                    yield _line(self._final(content, thinking))
                elif content or thinking:
                    yield _line(self._piece(content, False, thinking))
        except Exception as err:  # the status line is sent: say so in the stream, end it
            log.exception("stream for %s failed", self.req.model)
            yield _line({"error": str(InternalError(f"internal error ({type(err).__name__})"))})


def _line(obj: dict) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS) + b"\n"


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    loaded = server_state(request).registry.loaded()
    return {"models": await asyncio.to_thread(local_models, loaded)}


@router.post("/api/show")
async def show_model(request: Request) -> Response:
    try:
        body = await read_json(request)
        name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise RequestFieldError("model", 'give the model to show as {"model": NAME}')
        key = server_state(request).registry.reference(name)  # what a client may name
        return JSONResponse(await asyncio.to_thread(_show, key))
    except TandemError as err:
        return ollama_error(err)


def _show(key: str) -> dict:
    spec = resolve_spec(key)
    try:
        file = GGUFFile(spec.path)
    except GGUFError as err:  # say nothing of what the file holds (the log has it)
        log.warning("/api/show %s: %s", key, err)
        raise GGUFError(f"{key} is not a usable GGUF model file") from None
    with file:
        return show(spec, file)


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    return {"models": [ps_entry(m) for m in server_state(request).registry.loaded()]}


@router.get("/api/version")
async def version() -> dict:
    try:
        return {"version": metadata.version("tandem")}
    except metadata.PackageNotFoundError:
        return {"version": "0.0.0"}
