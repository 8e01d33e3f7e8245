"""build_app: the FastAPI app over one AsyncEngine. Routes stay thin; the work is in completions/chat/streaming.

The app owns the engine once built: its lifespan shutdown stops the engine loop. Draining in-flight requests
happens earlier, in the server (launch.py), while connections are still open to receive their last chunks.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.auth import APIKeyMiddleware
from tokenmill.server.chat import create_chat_completion, render_messages
from tokenmill.server.completions import create_completion
from tokenmill.server.metrics import ErrorCountingMiddleware, ServerMetrics
from tokenmill.server.openai_errors import RequestError, error_response, install_error_handlers
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from tokenmill.server.state import ServerState


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None, *,
              model_root: str = "", accepted_model_names: Iterable[str] = (), log_prompts: bool = False) -> FastAPI:
    state = ServerState(async_engine, served_model_name, model_root or served_model_name,
                        ServerMetrics(async_engine, served_model_name), frozenset(accepted_model_names), log_prompts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(ErrorCountingMiddleware, metrics=state.metrics)  # outermost: sees the 401s too

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, state)

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=served_model_name, root=state.model_root, max_model_len=state.max_model_len)
        return ModelList(data=[card])

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        state.check_request(body, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("send exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            ids = render_messages(body.messages, state, body.add_generation_prompt).ids
            if body.add_special_tokens and state.tokenizer.add_bos:
                ids.insert(0, state.tokenizer.bos_token_id)
        else:
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        strs = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        state.check_request(body, body.model)
        vocab = state.tokenizer.vocab_size
        if bad := [t for t in body.tokens if not 0 <= t < vocab]:
            raise RequestError(f"tokens out of range [0, {vocab}): {bad[:5]}", "tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))

    @app.get("/health")
    async def health() -> Response:
        if async_engine.is_alive:
            return Response(status_code=200)
        return error_response(503, "the engine loop is not running")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
