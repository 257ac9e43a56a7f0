"""The HTTP server: `create_app()` builds the FastAPI app (OpenAI and ollama APIs, /health,
/metrics); its lifespan preloads the --model in a worker thread, unloads models whose
keep-alive has run out, and closes every engine on shutdown. `serve()` runs it on uvicorn.

    /health   200 {"status": "ok"} when ready; 503 while the preloaded model loads (or
              {"status": "error"} if it failed to load)
    /metrics  Prometheus text (see metrics.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from runtime.errors import TandemError
from runtime.server import ollama_api, openai_api
from runtime.server.address import DEFAULT_HOST, DEFAULT_PORT
from runtime.server.models import ModelRegistry, RegistryOptions
from runtime.server.state import ServerState, server_state

log = logging.getLogger(__name__)
REAP_SECONDS = 1.0


async def _preload(state: ServerState) -> None:
    try:
        served, _ = await state.registry.get(state.preload, keep_alive=math.inf)
        state.registry.release(served)
    except TandemError as err:
        state.preload_error = str(err)
        log.error("could not load %s: %s", state.preload, err)


async def _reap(registry: ModelRegistry) -> None:
    while True:
        await asyncio.sleep(REAP_SECONDS)
        await registry.unload_expired()


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.tandem
    tasks = [asyncio.create_task(_reap(state.registry))]
    if state.preload:
        tasks.append(asyncio.create_task(_preload(state)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await state.registry.close()


def create_app(
    options: RegistryOptions | None = None,
    preload: str | None = None,
    registry: ModelRegistry | None = None,
) -> FastAPI:
    app = FastAPI(title="tandem", lifespan=_lifespan)
    app.state.tandem = ServerState(registry or ModelRegistry(options), preload=preload)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/", root, methods=["GET", "HEAD"])
    return app


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
) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(options, preload=model)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
