"""Run the app over one or more models under uvicorn with a graceful shutdown: on SIGTERM/SIGINT stop accepting
connections, let in-flight requests finish for up to `shutdown_timeout` seconds, abort the rest (their streams end
with finish_reason "abort"), stop the engines (app lifespan), and return normally so the process exits 0.

An engine core that dies (killed, out of memory, its loop broken) cannot be revived in place: its KV cache and
requests are gone. As vLLM's API server, this one then shuts down and exits with status 1, so that a
supervisor (systemd, Kubernetes) restarts it, instead of living on as a server that answers only 503s.
"""
from __future__ import annotations

import logging
import re
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.core_proc import EngineCoreHandle, release_freed_memory
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.server.app import build_app
from tokenmill.server.body_limit import DEFAULT_MAX_BODY_BYTES
from tokenmill.server.models import ModelRegistry
from tokenmill.server.params import RequestLimits
from tokenmill.server.result_cache import ResultCache
from tokenmill.server.state import ServerState

logger = logging.getLogger("tokenmill.server")


class _DrainingServer(uvicorn.Server):
    """uvicorn waits for open connections but never ends them; draining the engines first makes that wait short."""

    def __init__(self, config: uvicorn.Config, models: ModelRegistry, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.models = models
        self.shutdown_timeout = shutdown_timeout
        self.engine_death: str | None = None
        for m in models.models:
            m.async_engine.on_dead = self.engine_died

    def engine_died(self, reason: str) -> None:
        logger.error("shutting down: %s", reason)
        self.engine_death = reason
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting before the drain, not after it
        logger.info("draining %d in-flight requests (up to %.1f s)", self.models.num_in_flight,
                    self.shutdown_timeout)
        aborted = await self.models.drain(self.shutdown_timeout)
        if aborted:
            logger.warning("aborted %d requests still running after %.1f s", aborted, self.shutdown_timeout)
        await super().shutdown(sockets)


def _without_query_strings(record: logging.LogRecord) -> bool:
    """uvicorn's access line shows the full path; a client may put a key in the query string (`?api_key=...`),
    and none of this server's routes reads one, so the access log shows `?...` instead."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
        record.args = (*args[:2], args[2].partition("?")[0] + "?...", *args[3:])
    return True


def short_model_name(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`; a model folder -> its name."""
    name = path.name.removesuffix(".gguf")
    return re.sub(r"[.-](?:I?Q\d\w*|BF16|F16|F32)$", "", name, flags=re.IGNORECASE) or name


@dataclass
class ModelToServe:
    """A started engine core, this process's tokenizer of its model, the checkpoint's path, the name or path it was
    asked for by, and the id clients should send (None: the checkpoint's short name)."""

    core: EngineCoreHandle
    tokenizer: Tokenizer
    path: Path
    model_arg: str | None = None
    served_model_name: str | None = None
    identity: dict[str, Any] = field(default_factory=dict)  # EngineArgs.output_identity()


@dataclass
class ServerOptions:
    """What the HTTP side of a server is asked for, besides its models (the `tokenmill serve` options)."""

    api_key: str | None = None
    max_waiting: int | None = None
    log_prompts: bool = False
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allowed_hosts: list[str] | None = None
    allowed_origins: list[str] | None = None
    result_cache: ResultCache | None = None
    metrics_prefix: str = "tokenmill"


def build_server_app(models: Sequence[ModelToServe], options: ServerOptions) -> FastAPI:
    """Each model has its own engine core (waited for here, until it is up) and its own `max_waiting` queue limit;
    the result cache serves them all."""
    o = options
    registry = ModelRegistry([_start(m, o.max_waiting, o.log_prompts, o.limits, o.result_cache) for m in models],
                             o.metrics_prefix)
    release_freed_memory()  # the tokenizers' parsing, in this process
    for m in registry.models:
        logger.info("serving %s as %r", m.model_root, m.served_model_name)
    logger.info("API key %s, result cache %s; requests without `model` go to %r",
                "required" if o.api_key else "off", o.result_cache.name if o.result_cache else "off",
                registry.default.served_model_name)
    return build_app(registry, o.api_key, o.max_body_bytes, o.allowed_hosts, o.allowed_origins)


def serve(app: FastAPI, *, host: str, port: int, shutdown_timeout: float) -> None:
    """Serve a built app under uvicorn until SIGTERM/SIGINT (then drain) or an engine core's death (exit 1)."""
    registry: ModelRegistry = app.state.models
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_timeout)
    logging.getLogger("uvicorn.access").addFilter(_without_query_strings)  # after Config set up uvicorn's logging
    server = _DrainingServer(config, registry, shutdown_timeout)
    logger.info("listening on http://%s:%d", host, port)
    # uvicorn re-raises the signal it shut down on once it is done; ignoring it then lets us exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    server.run()
    if server.engine_death is not None:
        logger.error("exiting with status 1 because an engine core died: %s", server.engine_death)
        raise SystemExit(1)


def _start(model: ModelToServe, max_waiting: int | None, log_prompts: bool, limits: RequestLimits,
           result_cache: ResultCache | None) -> ServerState:
    path = model.path
    name = model.served_model_name or short_model_name(path)
    aliases = {str(path), *([model.model_arg] if model.model_arg else [])} - {name}
    return ServerState.create(AsyncEngine(model.core, model.tokenizer, max_waiting), name, model_root=str(path),
                              accepted_model_names=frozenset(aliases), log_prompts=log_prompts, limits=limits,
                              result_cache=result_cache, identity=model.identity)
