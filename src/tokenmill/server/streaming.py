"""From a Generation to an HTTP response: one JSON body, or Server-Sent Events ending in `data: [DONE]`.

The endpoint-specific part is a Formatter (completions and chat each have one); the loop, error events,
usage chunk and disconnect handling are here once. A client that goes away is noticed while its request waits
(a watcher on the ASGI receive channel) and while it streams (Starlette cancels the body), and either way the
Generation is closed, which aborts the engine request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from functools import partial
from typing import Protocol, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Send

from tokenmill.engine.async_engine import EngineDeadError, EngineStepError
from tokenmill.outputs import RequestOutput
from tokenmill.server.formatting import usage
from tokenmill.server.generation import ChoiceDelta, Generation
from tokenmill.server.openai_errors import error_body
from tokenmill.server.responses import Usage
from tokenmill.server.result_cache import Replay

logger = logging.getLogger("tokenmill.server")
T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client hung up first"; nobody reads it, the logs do


class Formatter(Protocol):
    def stream_start(self) -> list[BaseModel]: ...
    def chunk(self, delta: ChoiceDelta) -> BaseModel: ...
    def usage_chunk(self, usage: Usage) -> BaseModel: ...
    def response(self, outputs: list[RequestOutput], usage: Usage) -> BaseModel: ...


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def respond(request: Request, generation: Generation, formatter: Formatter, stream: bool,
                  include_usage: bool, body: BaseModel) -> Response:
    """`body`: the request, which keys the result cache (when the server has one)."""
    source: Generation | Replay = generation
    cache, key = generation.state.result_cache, None
    if cache is not None:
        params = generation.params
        key = cache.key(generation.state, request, body, params.greedy or params.seed is not None)
        if key is not None and (outputs := await cache.lookup(key)) is not None:
            generation.state.metrics.result_cache_hits.inc()
            source = Replay(generation, outputs)
        elif key is not None:
            generation.state.metrics.result_cache_misses.inc()
            generation.on_complete = partial(cache.save, key)
    try:
        await until_disconnected(request, source.start())
        if stream:
            return GenerationStream(source, formatter, include_usage)
        outputs = await until_disconnected(request, source.run_to_end())
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    response = formatter.response(outputs, usage(outputs))
    return Response(response.model_dump_json(), media_type="application/json")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (its cleanup aborts the engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # no-op when done; when the handler itself is cancelled, the work goes with it
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class GenerationStream(StreamingResponse):
    """SSE over a started Generation; the Generation is closed however the stream ends."""

    def __init__(self, generation: Generation | Replay, formatter: Formatter, include_usage: bool) -> None:
        super().__init__(_events(generation, formatter, include_usage), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def stream_response(self, send: Send) -> None:
        try:
            async with aclosing(self.body_iterator):
                await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):  # Starlette cancels the stream when the client leaves
                await self.generation.aclose()


async def _events(generation: Generation | Replay, formatter: Formatter, include_usage: bool) -> AsyncIterator[str]:
    try:
        for chunk in formatter.stream_start():
            yield _sse(chunk)
        async with aclosing(generation.deltas()) as deltas:
            async for delta in deltas:
                yield _sse(formatter.chunk(delta))
        if include_usage:
            yield _sse(formatter.usage_chunk(usage(generation.outputs)))
    except (EngineStepError, EngineDeadError) as exc:
        status = 503 if isinstance(exc, EngineDeadError) else 500
        yield f"data: {json.dumps(error_body(status, str(exc)))}\n\n"
    except Exception as exc:  # a bug mid-stream: the status is already sent, so report it in the stream
        logger.exception("stream %s failed", generation.request_id)
        yield f"data: {json.dumps(error_body(500, f'internal error: {type(exc).__name__}: {exc}'))}\n\n"
    yield "data: [DONE]\n\n"


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
