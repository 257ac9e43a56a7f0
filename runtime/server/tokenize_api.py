"""llama-server's utility endpoints, on a model tandem serves:

    POST /tokenize        {content, add_special=false, parse_special=true, with_pieces=false}
                          → {"tokens": [id, ...]}, or with_pieces [{"id", "piece"}, ...] (a
                          piece that is not whole UTF-8 is its list of byte values)
    POST /detokenize      {tokens: [id, ...]} → {"content": text}
    POST /apply-template  {messages: [...], chat_template_kwargs={}} → {"prompt": text}
                          (the model's chat template, its Modelfile SYSTEM and MESSAGEs
                          first, ready for generation; the kwargs as for a chat, e.g.
                          {"enable_thinking": false})

llama-server serves one model; here `model` names it, and may be left out while the server
holds exactly one (or was started with --model). Errors are OpenAI-shaped, as llama-server's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from quant.errors import TandemError
from runtime.loaded_model import LoadedModel
from runtime.server.errors import RequestFieldError, openai_error
from runtime.server.lenient import lenient
from runtime.server.openai_request import parse_chat
from runtime.server.state import ServerState, read_json, server_state

router = APIRouter()


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestFieldError(name, f"{name} must be true or false, got {value!r}")
    return value


def _model_name(state: ServerState, body: dict) -> str:
    name = body.get("model")
    if isinstance(name, str) and name:
        return name
    if state.preload:
        return state.preload
    loaded = state.registry.loaded()
    if len(loaded) == 1:
        return loaded[0].name
    raise RequestFieldError("model", 'name the model: {"model": NAME, ...}')


async def _with_model(request: Request, known: set[str], work) -> Response:
    """Parse the body, hold the named model while `work(lm, body)` runs in a thread."""
    state = server_state(request)
    try:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise RequestFieldError(None, "the request body must be a JSON object")
        lenient(body, known | {"model"})
        served, _ = await state.registry.get(_model_name(state, body))
        try:
            return JSONResponse(await asyncio.to_thread(work, served.lm, body))
        finally:
            state.registry.release(served)
    except TandemError as err:
        return openai_error(err)


def _piece(lm: LoadedModel, token_id: int) -> str | list[int]:
    raw = lm.tokenizer.piece(token_id, special=True)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _tokenize(lm: LoadedModel, body: dict) -> dict:
    content = body.get("content")
    if not isinstance(content, str):
        raise RequestFieldError("content", "content must be the text to tokenize")
    ids = lm.tokenizer.encode(
        content,
        add_special=_flag(body, "add_special", False),
        parse_special=_flag(body, "parse_special", True),
    )
    if _flag(body, "with_pieces", False):
        return {"tokens": [{"id": i, "piece": _piece(lm, i)} for i in ids]}
    return {"tokens": ids}


def _detokenize(lm: LoadedModel, body: dict) -> dict:
    tokens: Any = body.get("tokens")
    size = lm.tokenizer.vocab_size
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < size for t in tokens
    ):
        raise RequestFieldError("tokens", f"tokens must be a list of token ids (0..{size - 1})")
    return {"content": lm.tokenizer.decode(tokens, skip_special=False)}


def _apply_template(lm: LoadedModel, body: dict) -> dict:
    fields = {"model": "-", "messages": body.get("messages")}
    if "chat_template_kwargs" in body:
        fields["chat_template_kwargs"] = body["chat_template_kwargs"]
    req = parse_chat(fields)
    assert req.messages is not None  # parse_chat sets them or raises
    conversation = lm.conversation(req.messages)
    prompt = lm.template.render(conversation, add_generation_prompt=True, **req.template_kwargs)
    return {"prompt": prompt}


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    known = {"content", "add_special", "parse_special", "with_pieces"}
    return await _with_model(request, known, _tokenize)


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    return await _with_model(request, {"tokens"}, _detokenize)


@router.post("/apply-template")
async def apply_template(request: Request) -> Response:
    return await _with_model(request, {"messages", "chat_template_kwargs"}, _apply_template)
