"""HTTP errors: a TandemError as an OpenAI error object or an ollama {"error": ...} body.

ModelNotFoundError            -> 404  (OpenAI code "model_not_found")
QueueFullError, EngineClosed  -> 503  with Retry-After
ContextLengthError            -> 400  (OpenAI code "context_length_exceeded")
HTTPStatusError               -> its own status (401 API key, 403 Host/Origin, 413 body, 415 type, 404/405)
InternalError                 -> 500  (OpenAI type "server_error")
any other TandemError         -> 400  invalid_request_error
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from quant.errors import (
    ContextLengthError,
    EngineClosedError,
    InternalError,
    InvalidParameterError,
    ModelNotFoundError,
    QueueFullError,
    TandemError,
)


class RequestFieldError(InvalidParameterError):
    """A request body field has a bad value or is not supported; `param` names the field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class HTTPStatusError(TandemError):
    """A refusal decided by the HTTP layer, with its own status (403, 404, 405, 413, 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_of(err: TandemError) -> int:
    if isinstance(err, HTTPStatusError):
        return err.status
    if isinstance(err, InternalError):
        return 500
    if isinstance(err, ModelNotFoundError):
        return 404
    if isinstance(err, (QueueFullError, EngineClosedError)):
        return 503
    return 400


def _headers(err: TandemError) -> dict[str, str]:
    if isinstance(err, QueueFullError):
        return {"Retry-After": str(err.retry_after)}
    if isinstance(err, EngineClosedError):
        return {"Retry-After": "1"}
    return {}


def openai_error_body(err: TandemError) -> dict:
    """{"error": {message, type, param, code}} as OpenAI's API returns it."""
    status = status_of(err)
    code = None
    if isinstance(err, ContextLengthError):
        code = "context_length_exceeded"
    elif isinstance(err, ModelNotFoundError):
        code = "model_not_found"
    elif status == 401:
        code = "invalid_api_key"
    if status == 500:
        kind = "server_error"
    elif status < 500:
        kind = "invalid_request_error"
    else:
        kind = "service_unavailable_error"
    return {
        "error": {
            "message": str(err),
            "type": kind,
            "param": getattr(err, "param", None),
            "code": code,
        }
    }


def openai_error(err: TandemError) -> JSONResponse:
    return JSONResponse(openai_error_body(err), status_of(err), headers=_headers(err))


def ollama_error(err: TandemError) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_of(err), headers=_headers(err))


def error_for_path(path: str, err: TandemError) -> JSONResponse:
    """`err` in the shape of the API that `path` belongs to (OpenAI under /v1, else ollama)."""
    return openai_error(err) if path.startswith("/v1") else ollama_error(err)
