"""build_app: the FastAPI app over the served models. Routes stay thin; the work is in completions/chat/streaming.

Each route picks a model from the request's `model` field (ModelRegistry.route) and records it in the request's
state, so the error counter labels errors with it. The app owns the engines once built: its lifespan shutdown
stops every engine loop. Draining in-flight requests happens earlier, in the server (launch.py), while
connections are still open to receive their last chunks.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from tokenmill.server.auth import AllowedHostsMiddleware, APIKeyMiddleware
from tokenmill.server.body_limit import DEFAULT_MAX_BODY_BYTES, BodySizeLimitMiddleware
from tokenmill.server.chat import create_chat_completion, render_messages
from tokenmill.server.completions import create_completion
from tokenmill.server.embeddings import create_embeddings
from tokenmill.server.metrics import MODEL_NAME_KEY, ErrorCountingMiddleware
from tokenmill.server.models import ModelRegistry
from tokenmill.server.openai_errors import (
    RequestError,
    error_response,
    install_error_handlers,
)
from tokenmill.server.openapi import install_openapi
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    OpenAIRequest,
    TokenizeRequest,
)
from tokenmill.server.responses import DetokenizeResponse, EmbeddingResponse, ModelCard, ModelList, TokenizeResponse
from tokenmill.server.state import ServerState


def build_app(models: ModelRegistry, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models.attach()
        yield
        await asyncio.to_thread(models.shutdown)

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    app.state.models = models
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)  # innermost: after the key check
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    if allowed_hosts:
        app.add_middleware(AllowedHostsMiddleware, hosts=allowed_hosts)
    if allowed_origins:  # outside the key check: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials="*" not in allowed_origins)
    app.add_middleware(ErrorCountingMiddleware, metrics_for=models.metrics_for)  # outermost: sees the 401s too

    def route(body: OpenAIRequest, model: str | None, request: Request) -> ServerState:
        state = models.route(body, model)
        setattr(request.state, MODEL_NAME_KEY, state.served_model_name)
        return state

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, route(body, body.model, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, route(body, body.model, request))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
        return await create_embeddings(body, route(body, body.model, request))

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=m.served_model_name, root=m.model_root, max_model_len=m.max_model_len)
                               for m in models.models])

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        state = route(body, body.model, request)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("send exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            ids = render_messages(body.messages, state, body.add_generation_prompt, None,
                                  body.continue_final_message, body.chat_template_kwargs).ids
            if body.add_special_tokens and state.tokenizer.add_bos:
                ids.insert(0, state.tokenizer.bos_token_id)
        else:
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        strs = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        state = route(body, body.model, request)
        vocab = state.tokenizer.vocab_size
        if bad := [t for t in body.tokens if not 0 <= t < vocab]:
            raise RequestError(f"tokens out of range [0, {vocab}): {bad[:5]}", "tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": importlib.metadata.version("tokenmill")}

    @app.get("/health")
    async def health() -> Response:
        if not (problems := models.health_problems()):
            return Response(status_code=200)
        return error_response(503, "; ".join(problems))

    install_openapi(app, {
        "/health": {"description": "The engine serves (no body)", "content": {}},
        "/metrics": {"description": "Prometheus text exposition", "content": {CONTENT_TYPE_LATEST: {}}},
    })

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(models.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    return app
