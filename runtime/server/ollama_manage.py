"""ollama's model management API: POST /api/pull, POST /api/create, POST /api/copy,
DELETE /api/delete — the store's operations (loaders/pull.py, modelfiles/builder.py,
modelfiles/store.py) run in a worker thread.

/api/pull and /api/create answer as ollama does: with "stream" true (the default) NDJSON status
lines ({"status": "pulling manifest"}, {"status": "pulling <digest>", "digest", "total",
"completed"}, ..., {"status": "success"}), a failure after the first line as {"error": ...};
with "stream": false one {"status": "success"}. /api/copy and /api/delete answer 200 with an
empty body, 404 when the model is not stored; a deleted model is unloaded too.

/api/create takes the fields ollama ≥ 0.5 sends: model, from, parameters (JSON-typed),
template, system, license, messages, quantize, stream; `files` and `adapters` (blobs
uploaded to /api/blobs) are not supported. The older `modelfile` text is read too. A `from`
that is a path must lie under a --models-dir, as for any request that names a file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loaders.hf_pull import is_hf_ref
from loaders.pull import pull, pullable
from modelfiles import parameters as params
from modelfiles.builder import create_model, ensure_builtin
from modelfiles.hf_models import ensure_hf
from modelfiles.modelfile import Modelfile
from modelfiles.names import ModelName
from modelfiles.parser import parse_modelfile
from modelfiles.registry_models import ensure_registry, from_registry
from modelfiles.store import Store
from quant.errors import InternalError, InvalidParameterError, ModelfileError, TandemError
from runtime.server.errors import RequestFieldError, ollama_error
from runtime.server.lenient import lenient
from runtime.server.models import looks_like_path
from runtime.server.state import read_json, server_state

log = logging.getLogger(__name__)
router = APIRouter()

PULL_FIELDS = {"model", "name", "insecure", "stream", "username", "password"}
CREATE_FIELDS = {
    "model",
    "name",
    "from",
    "modelfile",
    "parameters",
    "template",
    "system",
    "license",
    "messages",
    "quantize",
    "stream",
    "files",
    "adapters",
    "path",
}
Status = dict[str, Any]


def _body(raw: Any, known: set[str]) -> dict:
    if not isinstance(raw, dict):
        raise RequestFieldError(None, "the request body must be a JSON object")
    lenient(raw, known)
    return raw


def _name(body: dict, *fields: str) -> ModelName:
    for field in fields:
        text = body.get(field)
        if isinstance(text, str) and text:
            return ModelName.parse(text)
    raise RequestFieldError(fields[0], f'give the model as {{"{fields[0]}": NAME}}')


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise RequestFieldError("stream", f"stream must be true or false, got {stream!r}")
    return stream


async def _progress(work: Callable[[Callable[[Status], None]], None], stream: bool) -> Response:
    """Run `work(say)` in a thread; every status it says becomes a line (stream) and the
    last is the answer (not streamed). An error before anything was said is a plain error."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Status | BaseException | None] = asyncio.Queue()

    def say(status: Status) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, status)

    def run() -> None:
        try:
            work(say)
        except BaseException as err:  # reported on the loop, in the API's shape
            loop.call_soon_threadsafe(queue.put_nowait, err)
        else:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = loop.run_in_executor(None, run)
    first = await queue.get()
    if isinstance(first, BaseException):
        await task
        return ollama_error(_tandem(first))
    if not stream:
        last = first
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                await task
                return ollama_error(_tandem(item))
            last = item
        await task
        return JSONResponse(last)

    async def lines() -> AsyncIterator[str]:
        item: Status | BaseException | None = first
        while item is not None:
            if isinstance(item, BaseException):
                yield json.dumps({"error": str(_tandem(item))}) + "\n"
                break
            yield json.dumps(item) + "\n"
            item = await queue.get()
        await task

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _tandem(err: BaseException) -> TandemError:
    if isinstance(err, TandemError):
        return err
    log.error("model management failed", exc_info=err)
    return InternalError(f"internal error ({type(err).__name__}); the server's log has the details")


# -- pull -------------------------------------------------------------------------------------


@router.post("/api/pull")
async def pull_model(request: Request) -> Response:
    try:
        body = _body(await read_json(request), PULL_FIELDS)
        name = str(_name(body, "model", "name"))
        # a catalog entry, known before the first line (404 for a name that is not one), or
        # an hf.co reference / ollama registry name, looked up by the pull itself
        entry = None if is_hf_ref(name) or from_registry(name) else pullable(name)
        stream = _stream_flag(body)
    except TandemError as err:
        return ollama_error(err)

    def work(say: Callable[[Status], None]) -> None:
        say({"status": "pulling manifest"})
        if entry is None:
            _pull_elsewhere(name, say)
            return
        digest = f"sha256:{entry.sha256}"
        label = {"status": f"pulling {entry.sha256[:12]}", "digest": digest}

        def bar(done: int, total: int) -> None:
            say({**label, "total": total, "completed": done})

        path = pull(entry.name, bar)
        size = path.stat().st_size
        say({**label, "total": size, "completed": size})
        say({"status": "verifying sha256 digest"})
        say({"status": "writing manifest"})
        ensure_builtin(Store(), ModelName.parse(entry.name))
        say({"status": "success"})

    return await _progress(work, stream)


def _pull_elsewhere(name: str, say: Callable[[Status], None]) -> None:
    """An hf.co reference or an ollama registry name, pulled into the store as `tandem pull`
    pulls it (its byte progress goes to the server's log, not to the stream)."""
    if is_hf_ref(name):
        _, manifest = ensure_hf(Store(), name, refresh=True)
    else:
        _, manifest = ensure_registry(Store(), name, refresh=True)
    digest, size = manifest.model.digest, manifest.model.size
    label = {"status": f"pulling {digest.removeprefix('sha256:')[:12]}", "digest": digest}
    say({**label, "total": size, "completed": size})
    say({"status": "verifying sha256 digest"})
    say({"status": "writing manifest"})
    say({"status": "success"})


# -- create -----------------------------------------------------------------------------------


@router.post("/api/create")
async def create(request: Request) -> Response:
    state = server_state(request)
    try:
        body = _body(await read_json(request), CREATE_FIELDS)
        name = _name(body, "model", "name")
        mf = _modelfile(body)
        if looks_like_path(mf.from_):
            mf.from_ = state.registry.reference(mf.from_)  # only under a --models-dir
        quantize = body.get("quantize")
        if quantize is not None and not isinstance(quantize, str):
            raise RequestFieldError("quantize", "quantize must be a type name such as q4_0")
        stream = _stream_flag(body)
    except TandemError as err:
        return ollama_error(err)

    def work(say: Callable[[Status], None]) -> None:
        say({"status": "gathering model components"})
        create_model(Store(), name, mf, Path.cwd(), quantize, lambda text: say({"status": text}))

    return await _progress(work, stream)


def _modelfile(body: dict) -> Modelfile:
    """The Modelfile the request describes: its `modelfile` text, or the JSON fields."""
    for field in ("files", "adapters", "path"):
        if body.get(field):
            raise RequestFieldError(
                field,
                f"{field} is not supported (tandem takes no uploaded blobs); name a stored "
                'model or a .gguf under a --models-dir in "from"',
            )
    text = body.get("modelfile")
    if text is not None:
        if not isinstance(text, str):
            raise RequestFieldError("modelfile", "modelfile must be the Modelfile's text")
        try:
            mf = parse_modelfile(text)
        except ModelfileError as err:
            raise RequestFieldError("modelfile", str(err)) from None
    else:
        source = body.get("from")
        if not isinstance(source, str) or not source:
            raise RequestFieldError("from", 'give the base model as {"from": NAME}')
        mf = Modelfile(source)
    for field in ("template", "system"):
        value = body.get(field)
        if value is not None:
            if not isinstance(value, str):
                raise RequestFieldError(field, f"{field} must be a string")
            setattr(mf, field, value)
    if body.get("from") and text is not None:
        mf.from_ = body["from"]
    if mf.adapters:
        raise RequestFieldError("modelfile", "ADAPTER is not supported through the API")
    lic = body.get("license")
    if lic is not None:
        mf.license = [lic] if isinstance(lic, str) else _strings("license", lic)
    if body.get("parameters") is not None:
        mf.parameters.update(_parameters(body["parameters"]))
    if body.get("messages") is not None:
        mf.messages = _messages(body["messages"])
    return mf


def _strings(field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestFieldError(field, f"{field} must be a string or a list of strings")
    return value


def _parameters(raw: Any) -> dict[str, Any]:
    """JSON parameters typed as PARAMETER lines would be: {"temperature": 0.5, "stop": [..]}."""
    if not isinstance(raw, dict):
        raise RequestFieldError("parameters", "parameters must be an object of names to values")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = str(name).lower()
        if not params.known(key) or not params.PARAMETERS[key].modelfile:
            raise RequestFieldError(
                "parameters", f"unknown parameter {name!r}; known: {', '.join(params.PARAMETERS)}"
            )
        values = value if isinstance(value, list) else [value]
        if len(values) > 1 and not params.PARAMETERS[key].repeated:
            raise RequestFieldError("parameters", f"parameter {key} takes one value")
        try:
            typed = [params.parse_value(key, _text(v)) for v in values]
        except (ValueError, InvalidParameterError) as err:
            raise RequestFieldError("parameters", f"bad value for {key}: {err}") from None
        out[key] = typed if params.PARAMETERS[key].repeated else typed[0]
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ValueError(f"{value!r} is not a number, string or boolean")


def _messages(raw: Any) -> list[dict[str, str]]:
    ok = isinstance(raw, list) and all(
        isinstance(m, dict)
        and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str)
        for m in raw
    )
    if not ok:
        raise RequestFieldError(
            "messages", "messages must be a list of {role: system|user|assistant, content}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in raw]


# -- copy, delete -----------------------------------------------------------------------------


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    try:
        body = _body(await read_json(request), {"source", "destination"})
        src, dst = _name(body, "source"), _name(body, "destination")
        await asyncio.to_thread(Store().copy, src, dst)
    except TandemError as err:
        return ollama_error(err)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    try:
        body = _body(await read_json(request), {"model", "name"})
        name = _name(body, "model", "name")
        await asyncio.to_thread(Store().remove, name)
        await server_state(request).registry.unload(str(name))  # no longer listed or served
    except TandemError as err:
        return ollama_error(err)
    return Response(status_code=200)
