"""A cap on request body size, answered with 413 before the body is parsed.

A JSON body is parsed whole, so a 50 MB body costs the event loop (and so every stream) its parse time and
memory before any field check can refuse it. A declared Content-Length over the cap is refused without reading;
a chunked body is read up to the cap and then refused.
"""
from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.openai_errors import error_response

DEFAULT_MAX_BODY_BYTES = 16 * 2**20


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and not declared.isdigit():
            await error_response(400, f"Content-Length must be a byte count, got {declared!r}",
                                 headers={"Connection": "close"})(scope, receive, send)
            return
        if declared is not None and int(declared) > self.max_bytes:
            await self._too_large(f"{declared} bytes", scope, receive, send)
            return
        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._too_large(f"over {self.max_bytes} bytes", scope, receive, send)
                return
        await self.app(scope, _replay(b"".join(body), receive), send)

    async def _too_large(self, size: str, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is {size}, over this server's limit of {self.max_bytes} bytes (--max-body-bytes)"
        await error_response(413, message, headers={"Connection": "close"})(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body once, then the real channel (so a later disconnect is still seen)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
