"""The HTTP server: `create_app()` builds the FastAPI app (OpenAI and ollama APIs, /health,
/metrics); its lifespan preloads the --model in a worker thread, unloads models whose
keep-alive has run out, and closes every engine on shutdown. `serve()` runs it on uvicorn.

    /health   200 {"status": "ok"} when ready; 503 while the preloaded model loads (or
              {"status": "error"} if it failed to load)
    /metrics  Prometheus text (see metrics.py)

Every request first passes the Guard (guard.py: Host, Origin, content type, body size, and
a 500 in the API's own shape for whatever a handler did not answer); FastAPI's own 404 and
405 come back in the API's shape too. SIGTERM always ends the process: shutdown waits at
most SHUTDOWN_SECONDS for engines to close, and a worker thread still stuck (a render, a
load) after uvicorn returns does not keep the process alive (`run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quant.errors import TandemError
from runtime.server import (
    embeddings_api,
    ollama_api,
    ollama_manage,
    openai_api,
    tokenize_api,
    webui,
)
from runtime.server.address import DEFAULT_HOST, DEFAULT_PORT
from runtime.server.errors import HTTPStatusError, error_for_path
from runtime.server.guard import Guard, GuardOptions
from runtime.server.models import ModelRegistry, RegistryOptions
from runtime.server.state import ServerState, server_state

log = logging.getLogger(__name__)
REAP_SECONDS = 1.0
GRACEFUL_SECONDS = 5  # uvicorn waits this long for open requests at shutdown
SHUTDOWN_SECONDS = 10.0  # closing the engines at shutdown waits at most this long
EXIT_GRACE_SECONDS = 2.0  # then worker threads get this long before the process exits anyway


async def _preload(state: ServerState, name: str) -> None:
    try:
        served, _ = await state.registry.get(name, keep_alive=math.inf, trusted=True)
        state.registry.release(served)
    except TandemError as err:
        state.preload_error = str(err)
        log.error("could not load %s: %s", name, err)


async def _reap(registry: ModelRegistry) -> None:
    while True:
        await asyncio.sleep(REAP_SECONDS)
        await registry.unload_expired()


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.tandem
    tasks = [asyncio.create_task(_reap(state.registry))]
    if state.preload:
        tasks.append(asyncio.create_task(_preload(state, state.preload)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(state.registry.close(), SHUTDOWN_SECONDS)
        except asyncio.TimeoutError:
            log.warning("engines did not close within %ss; exiting anyway", SHUTDOWN_SECONDS)


def create_app(
    options: RegistryOptions | None = None,
    preload: str | None = None,
    registry: ModelRegistry | None = None,
    guard: GuardOptions | None = None,
) -> FastAPI:
    app = FastAPI(title="tandem", lifespan=_lifespan)
    app.state.tandem = ServerState(registry or ModelRegistry(options), preload=preload)
    app.add_middleware(Guard, options=guard or GuardOptions())
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(ollama_manage.router)
    app.include_router(tokenize_api.router)
    app.include_router(embeddings_api.router)
    webui.install(app)  # the chat page at / and a local /docs (runtime/server/webui.py)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/", root, methods=["GET", "HEAD"])
    return app


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own refusals (404 no such route, 405 wrong method) in the API's shape."""
    assert isinstance(exc, StarletteHTTPException)
    response = error_for_path(request.url.path, HTTPStatusError(exc.status_code, str(exc.detail)))
    response.headers.update(exc.headers or {})
    return response


async def health(request: Request) -> JSONResponse:
    state = server_state(request)
    if state.preload_error:
        return JSONResponse({"status": "error", "error": state.preload_error}, 503)
    if not state.ready:
        return JSONResponse({"status": "loading", "model": state.preload}, 503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> PlainTextResponse:
    state = server_state(request)
    engines = [(m.name, m.engine.stats()) for m in state.registry.loaded()]
    return PlainTextResponse(
        state.metrics.render(engines), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


async def root() -> PlainTextResponse:
    return PlainTextResponse("tandem is running")


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    model: str | None = None,
    options: RegistryOptions | None = None,
    max_body: int | None = None,
    api_key: str | None = None,
    origins: tuple[str, ...] = (),
) -> None:
    """Run the server until interrupted (SIGINT or SIGTERM); the process then exits."""
    guard = GuardOptions(bind_host=host, origins=origins, api_key=api_key)
    if max_body is not None:
        guard = dataclasses.replace(guard, max_body=max_body)
    run(create_app(options, preload=model, guard=guard), host, port)


def run(app: FastAPI, host: str, port: int) -> None:
    """uvicorn until a signal, then out of the process: a worker thread that is still busy
    (a render or a load that will not end) gets EXIT_GRACE_SECONDS, then the process exits
    without it. asyncio's own shutdown joins the loop's worker threads without a limit, so a
    watchdog also ends the process if shutdown has not finished in time."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=GRACEFUL_SECONDS
    )
    server = uvicorn.Server(config)
    threading.Thread(
        target=_watchdog, args=(server,), name="tandem-exit-watchdog", daemon=True
    ).start()
    server.run()
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    while time.monotonic() < deadline and _busy_threads():
        time.sleep(0.05)
    stuck = _busy_threads()
    if stuck:
        log.warning("exiting with %d worker thread(s) still busy", len(stuck))
        _exit()


def _watchdog(server) -> None:
    while not server.should_exit:
        time.sleep(0.1)
    time.sleep(GRACEFUL_SECONDS + SHUTDOWN_SECONDS + EXIT_GRACE_SECONDS)
    log.warning("shutdown did not finish in time (a worker thread is stuck); exiting")
    _exit()


def _exit() -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _busy_threads() -> list[threading.Thread]:
    """Threads that would keep the interpreter from exiting (not daemon, not this one)."""
    me = threading.current_thread()
    return [t for t in threading.enumerate() if t is not me and t.is_alive() and not t.daemon]
