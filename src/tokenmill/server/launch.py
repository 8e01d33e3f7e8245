"""Run the app under uvicorn with a graceful shutdown: on SIGTERM/SIGINT stop accepting connections, let
in-flight requests finish for up to `shutdown_timeout` seconds, abort the rest (their streams end with
finish_reason "abort"), stop the engine (app lifespan), and return normally so the process exits 0.
"""
from __future__ import annotations

import logging
import re
import signal
import socket
from pathlib import Path

import uvicorn

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.llm import LLM
from tokenmill.server.app import build_app

logger = logging.getLogger("tokenmill.server")


class _DrainingServer(uvicorn.Server):
    """uvicorn waits for open connections but never ends them; draining the engine first makes that wait short."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.async_engine = async_engine
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting before the drain, not after it
        logger.info("draining %d in-flight requests (up to %.1f s)", self.async_engine.num_in_flight,
                    self.shutdown_timeout)
        aborted = await self.async_engine.drain(self.shutdown_timeout)
        if aborted:
            logger.warning("aborted %d requests still running after %.1f s", aborted, self.shutdown_timeout)
        await super().shutdown(sockets)


def short_model_name(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`; a model folder -> its name."""
    name = path.name.removesuffix(".gguf")
    return re.sub(r"[.-](?:I?Q\d\w*|BF16|F16|F32)$", "", name, flags=re.IGNORECASE) or name


def serve(llm: LLM, *, host: str, port: int, api_key: str | None, max_waiting: int | None,
          served_model_name: str | None, model_arg: str | None, shutdown_timeout: float, log_prompts: bool) -> None:
    path = llm.checkpoint.path
    name = served_model_name or short_model_name(path)
    aliases = {str(path), *([model_arg] if model_arg else [])} - {name}
    async_engine = AsyncEngine(llm.engine, max_waiting=max_waiting)
    app = build_app(async_engine, name, api_key, model_root=str(path), accepted_model_names=aliases,
                    log_prompts=log_prompts)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_timeout)
    server = _DrainingServer(config, async_engine, shutdown_timeout)
    logger.info("serving %s as %r on http://%s:%d (API key %s)", path, name, host, port,
                "required" if api_key else "off")
    # uvicorn re-raises the signal it shut down on once it is done; ignoring it then lets us exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    server.run()
