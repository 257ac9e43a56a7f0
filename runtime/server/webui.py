"""The web chat page at `/` and a local API reference at `/docs`: static files shipped in the
package (runtime/server/static/), no build step and nothing fetched from a CDN, so both work
offline. `install(app)` mounts them; `tandem serve --no-webui` turns the page off (`/` then
answers "tandem is running", as before).

FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN; install() removes those
routes and serves /docs as a plain page built here from the app's OpenAPI schema.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "markdown.js": "text/javascript"}
CDN_ROUTES = ("/docs", "/docs/oauth2-redirect", "/redoc")
SECURITY = {  # the page runs no code but its own and talks only to this server
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter()
enabled = True  # `tandem serve --no-webui` sets False


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index() -> Response:
    if not enabled:
        return PlainTextResponse("tandem is running")
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY)


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if not enabled or name not in ASSETS:  # a fixed list: no path reaches outside STATIC
        return PlainTextResponse("not found", 404)
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=SECURITY)


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(api_reference(request.app.openapi()), headers=SECURITY)


def api_reference(schema: dict) -> str:
    """The endpoints of the OpenAPI schema as one HTML page (the schema itself: /openapi.json)."""
    rows = []
    for path, methods in sorted(schema.get("paths", {}).items()):
        for method, op in methods.items():
            summary = html.escape(op.get("summary") or op.get("description") or "")
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{summary}</td></tr>"
            )
    title = html.escape(schema.get("info", {}).get("title", "API"))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title>"
        "<link rel='stylesheet' href='/static/style.css'></head><body class='docs'>"
        f"<h1>{title} API</h1><p>The OpenAI-compatible and ollama-compatible endpoints this "
        "server answers. The machine-readable schema: <a href='/openapi.json'>/openapi.json"
        "</a>.</p><table><tr><th>method</th><th>path</th><th>what</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


def install(app: FastAPI) -> None:
    """Mount the page and the local /docs on `app` (before its other `/` route, so the page
    answers there), and drop FastAPI's CDN-loading documentation routes."""
    app.router.routes[:] = [
        r for r in app.router.routes if getattr(r, "path", None) not in CDN_ROUTES
    ]
    app.include_router(router)
