"""Every error leaves the server in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.

OpenAI clients read `error.message` and map the status to an exception class, so a bad field is a 400 that
names it (never FastAPI's 422 with its own body), a full queue is a 429 with Retry-After, and an engine
failure is a 500 that leaves the server running, and a dead engine a 503 (the server then exits).
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tokenmill.engine.async_engine import (
    EngineDeadError,
    EngineStepError,
    QueueFullError,
)

# The class names the openai package raises for each status; vLLM uses the same names as `type`.
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowedError",
          429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
RETRY_AFTER_SECONDS = 1
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}  # how pydantic labels union members in error locations


class RequestError(Exception):
    """A request the server refuses; `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """Message and param escaped to valid UTF-8 (they may quote client text), so the error itself always encodes."""
    error_type = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": _utf8(message), "type": error_type, "param": _utf8(param) if param else param,
                      "code": status}}


def _utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def validation_error_param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as OpenAI writes a param ("messages[0].role"), without union member tags."""
    parts = [p for p in loc[1:] if isinstance(p, int) or (p.isidentifier() and p.islower() and p not in _TYPE_TAGS)]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return error_response(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return error_response(400, "the request body is missing: send a JSON object with the request's fields")
    param = validation_error_param(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return error_response(400, f"{param}: {message}" if param else message, param)


async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc.status, str(exc), exc.param)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return error_response(exc.status_code, message, headers=exc.headers)


async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    return error_response(429, f"the server is busy: {exc}; retry later",
                          headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, str(exc))


async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
    """The server cannot serve until it is restarted (it exits on its own for that): 503, as vLLM."""
    return error_response(503, str(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: Starlette re-raises it after sending this, so uvicorn logs the traceback."""
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(QueueFullError, _queue_full)
    app.add_exception_handler(EngineStepError, _engine_error)
    app.add_exception_handler(EngineDeadError, _engine_dead)
    app.add_exception_handler(Exception, _unexpected)
