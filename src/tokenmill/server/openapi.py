"""The OpenAPI document, corrected to what the server does, so generated clients and conformance checkers
(schemathesis) read the truth: a bad request is a 400 in OpenAI's error shape, never FastAPI's 422, and any route
may answer an error status (401, 404, 413, 429, 500, 503) in that shape."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": "integer"}},
    }},
}
_ERROR_RESPONSE = {"description": "An error in OpenAI's shape",
                   "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def install_openapi(app: FastAPI, plain: dict[str, dict[str, Any]]) -> None:
    """`plain`: path -> the 200 response of routes that answer something other than JSON (/metrics, /health)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["ErrorResponse"] = _ERROR
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for path, item in schema["paths"].items():
                for operation in item.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    responses["400"] = {**_ERROR_RESPONSE, "description": "A request field is invalid (`param`)"}
                    responses["default"] = _ERROR_RESPONSE
                    if path in plain:
                        responses["200"] = plain[path]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
