"""Who may call: the API key check and an optional Host allow-list, in front of the routes.

Raw ASGI middlewares rather than FastAPI dependencies: they answer before the body is parsed, so an
unauthenticated client learns nothing about validation, and they also guard /v1 paths that have no route.
/health and /metrics need no key, as in vLLM, so load balancers and Prometheus need none.
"""
from __future__ import annotations

import hashlib
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenmill.server.openai_errors import error_response

PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


class APIKeyMiddleware:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 7235, as vLLM). The SHA-256 digests are compared,
    in constant time, so neither the key's bytes nor its length leak through timing."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = _digest(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _protected(scope["path"]):
            scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(_digest(key.strip()), self.expected):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          headers={"WWW-Authenticate": 'Bearer realm="tokenmill"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AllowedHostsMiddleware:
    """Requests must name one of `hosts` in their Host header (port ignored). A web page the user opens can make
    the browser send requests to 127.0.0.1 under the page's own host name (DNS rebinding); a server without an
    API key trusts whoever can reach it, so this is its guard."""

    def __init__(self, app: ASGIApp, hosts: list[str]) -> None:
        self.app = app
        self.hosts = {h.lower().strip("[]") for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _host_name(Headers(scope=scope).get("host", "")) not in self.hosts:
            await error_response(400, "the Host header names a host this server does not answer for "
                                      "(--allowed-hosts)")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _protected(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PROTECTED_PREFIXES)
