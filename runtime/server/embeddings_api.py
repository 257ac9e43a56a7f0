"""Embeddings, from any model the server serves (runtime/engine/embedder.py: prefill only, no
KV kept, pooled as the GGUF names it, else the mean; every vector L2-normalised):

    POST /v1/embeddings   OpenAI: input a string, a list of strings, a list of token ids or a
                          list of such lists; `dimensions` keeps the first N components (then
                          normalised again, as OpenAI's shortened embeddings are);
                          `encoding_format` "float" or "base64" (little-endian float32)
    POST /api/embed       ollama: input a string or a list of strings; `truncate` (default true)
                          cuts an input to the context, false refuses it; `dimensions`
    POST /api/embeddings  ollama's older form: {"prompt": text} → {"embedding": [...]}

A request's inputs go to the model's engine as one job; jobs that wait together share one
forward (runtime/engine/engine.py).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from quant.errors import ContextLengthError, TandemError
from runtime.server.errors import RequestFieldError, ollama_error, openai_error
from runtime.server.keep_alive import parse_keep_alive
from runtime.server.lenient import lenient
from runtime.server.models import ServedModel
from runtime.server.state import ServerState, read_json, server_state

router = APIRouter()
MAX_INPUTS = 2048  # as OpenAI's API
OPENAI_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
EMBED_FIELDS = {"model", "input", "truncate", "options", "keep_alive", "dimensions"}
LEGACY_FIELDS = {"model", "prompt", "options", "keep_alive"}

Inputs = list[str] | list[list[int]]


def _body(raw: Any, known: set[str]) -> dict:
    if not isinstance(raw, dict):
        raise RequestFieldError(None, "the request body must be a JSON object")
    lenient(raw, known)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise RequestFieldError("model", "model must be a non-empty string naming the model")
    return raw


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _inputs(value: Any, token_ids: bool) -> Inputs:
    """A string, strings, (with token_ids) ids or lists of ids → the list of inputs."""
    if isinstance(value, str):
        value = [value]
    elif token_ids and _is_ids(value):
        value = [value]
    ok = (
        isinstance(value, list)
        and 0 < len(value) <= MAX_INPUTS
        and (
            all(isinstance(v, str) and v for v in value)
            or (token_ids and all(_is_ids(v) for v in value))
        )
    )
    if not ok:
        kinds = "a string, a list of strings, token ids or lists of token ids"
        raise RequestFieldError(
            "input",
            f"input must be {kinds if token_ids else 'a string or a list of strings'}, "
            f"non-empty, at most {MAX_INPUTS} of them",
        )
    return value


def _dimensions(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestFieldError("dimensions", f"dimensions must be an integer >= 1, got {value!r}")
    return value


def _ids(served: ServedModel, inputs: Inputs, truncate: bool) -> list[list[int]]:
    """Token ids of each input, each fitting the model's context (cut, or refused)."""
    tok, limit = served.lm.tokenizer, served.num_ctx
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            ids = tok.encode(item, add_special=True, parse_special=False)
        else:
            bad = [t for t in item if t >= tok.vocab_size]
            if bad:
                raise RequestFieldError(
                    "input",
                    f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})",
                )
            ids = list(item)
        if not ids:
            raise RequestFieldError("input", f"input {i} gives no tokens")
        if len(ids) >= limit:  # the engine's rule for any prompt: less than num_ctx
            if not truncate:
                raise ContextLengthError(
                    f"input {i} has {len(ids)} tokens; this model's context holds {limit}; "
                    "shorten it (or let the server cut it: truncate true)"
                )
            ids = ids[: limit - 1]
        out.append(ids)
    return out


async def _embed(
    state: ServerState,
    model: str,
    inputs: Inputs,
    truncate: bool,
    dimensions: int | None,
    keep_alive: float | None = None,
) -> tuple[torch.Tensor, int, float]:
    """(vectors (B, E'), prompt tokens, load seconds)."""
    served, load_seconds = await state.registry.get(model, keep_alive)
    try:
        ids = await asyncio.to_thread(_ids, served, inputs, truncate)
        vectors = await asyncio.wrap_future(served.engine.embed(ids))  # (B, E)
    finally:
        state.registry.release(served)
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = F.normalize(vectors[:, :dimensions], dim=-1)
    return vectors, sum(len(i) for i in ids), load_seconds


@router.post("/v1/embeddings")
async def openai_embeddings(request: Request) -> Response:
    state = server_state(request)
    try:
        body = _body(await read_json(request), OPENAI_FIELDS)
        inputs = _inputs(body.get("input"), token_ids=True)
        dimensions = _dimensions(body.get("dimensions"))
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise RequestFieldError(
                "encoding_format", 'encoding_format must be "float" or "base64"'
            )
        vectors, tokens, _ = await _embed(state, body["model"], inputs, False, dimensions)
    except TandemError as err:
        return openai_error(err)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, fmt)}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": body["model"], "usage": usage})


def _encode(vector: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":
        raw = vector.to(torch.float32).numpy().astype("<f4").tobytes()
        return base64.b64encode(raw).decode("ascii")
    return vector.tolist()


def _keep_alive(body: dict) -> float | None:
    return None if body.get("keep_alive") is None else parse_keep_alive(body["keep_alive"])


@router.post("/api/embed")
async def ollama_embed(request: Request) -> Response:
    state, arrived = server_state(request), time.perf_counter()
    try:
        body = _body(await read_json(request), EMBED_FIELDS)
        inputs = _inputs(body.get("input"), token_ids=False)
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise RequestFieldError("truncate", "truncate must be true or false")
        dimensions = _dimensions(body.get("dimensions"))
        vectors, tokens, load = await _embed(
            state, body["model"], inputs, truncate, dimensions, _keep_alive(body)
        )
    except TandemError as err:
        return ollama_error(err)
    ns = 1e9
    return JSONResponse(
        {
            "model": body["model"],
            "embeddings": vectors.tolist(),
            "total_duration": int((time.perf_counter() - arrived) * ns),
            "load_duration": int(load * ns),
            "prompt_eval_count": tokens,
        }
    )


@router.post("/api/embeddings")
async def ollama_embeddings(request: Request) -> Response:
    state = server_state(request)
    try:
        body = _body(await read_json(request), LEGACY_FIELDS)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestFieldError("prompt", "prompt must be a non-empty string")
        vectors, _, _ = await _embed(state, body["model"], [prompt], True, None, _keep_alive(body))
    except TandemError as err:
        return ollama_error(err)
    return JSONResponse({"embedding": vectors[0].tolist()})
