"""`tokenmill serve --replicas N`: N engine replicas as a Ray Serve deployment behind one OpenAI endpoint.

Each replica builds the same app a single `tokenmill serve` process runs (its own engine core, KV cache, result
cache client, limits) and answers HTTP calls in-process through it, so every endpoint, error and stream behaves
as in one process. The HTTP front is the `tokenmill serve` process itself (uvicorn; Ray Serve's HTTP proxy is
off, which saves a second Ray hop per streamed chunk): it parses only the prompt's text out of the body, for the
deployment handle's request router (routing.py), and relays the replica's status, headers and body chunks; a
replica that dies mid-request gives that request a 503 (or, once streaming, an error event), and Ray Serve starts
a new one.
`/metrics` merges every replica's exposition with a `replica` label. Ray Serve's autoscaler sizes the replica
set from ongoing requests per replica when --min-replicas/--max-replicas are given.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import ray
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from tokenmill.distributed import live
from tokenmill.distributed.relay import merge_expositions, relayed
from tokenmill.distributed.routing import HTTPCall, block_hashes, prompt_text
from tokenmill.server.openai_errors import error_response

logger = logging.getLogger("tokenmill.distributed")
REPLICA_HEADER = "x-tokenmill-replica"  # which replica answered (for clients' logs and the routing tests)
APP_NAME = "tokenmill"
METRICS_TIMEOUT = 5.0  # seconds a replica gets to answer for /metrics (a dead one is left out)


@dataclass
class ReplicaSet:
    """How many engine replicas, how they scale and how requests pick one."""

    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: Ray Serve autoscales between them
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # per replica, what the autoscaler steers to
    max_ongoing_requests: int = 512  # per replica; beyond it the router waits for room
    routing: str = "prefix"  # or "round-robin"
    spill_over: int = 4  # a prefix-affine replica may have this many more requests queued than the least loaded
    gpus: int = 0  # per replica (the GPU path): Ray Serve places each on its own GPU and shows it only that one

    def deployment_options(self) -> dict:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give --min-replicas and --max-replicas together (or neither)")
        options: dict = {"max_ongoing_requests": self.max_ongoing_requests,
                         "ray_actor_options": {"num_cpus": 0, "num_gpus": self.gpus},
                         "request_router_config": RequestRouterConfig(
                             request_router_class="tokenmill.distributed.routing:PrefixAffinityRouter",
                             request_router_kwargs={"policy": self.routing, "spill_over": self.spill_over})}
        if self.min_replicas is None:
            if self.replicas < 1:
                raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
            return {**options, "num_replicas": self.replicas}
        if not 0 <= self.min_replicas <= self.replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= --min-replicas <= --replicas <= --max-replicas and --max-replicas >= 1, got "
                             f"{self.min_replicas}, {self.replicas}, {self.max_replicas}")
        return {**options, "autoscaling_config": {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas, "initial_replicas": self.replicas,
            "target_ongoing_requests": self.target_ongoing_requests}}


class EngineReplica:
    """One engine and the app over it; `handle` yields the response's start (status, headers), then body chunks."""

    def __init__(self, app_factory: Callable[[int], FastAPI]) -> None:
        """app_factory(rank): the app over a freshly loaded engine; the rank (0..replicas-1, reused by a replica
        that replaces a dead one) gives each engine its own KV event ports."""
        _normal_priority()  # before the engine core is forked: it inherits this
        context = serve.get_replica_context()
        self.app = app_factory(context.rank.rank)
        self.models = self.app.state.models
        self.replica_id = context.replica_id.unique_id
        self._attached = False

    async def handle(self, call: HTTPCall) -> AsyncIterator[dict | bytes]:
        if not self._attached:  # the engines' outputs are read on this replica's event loop
            self.models.attach()
            self._attached = True
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": call.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": call.method,
                 "scheme": "http", "path": call.path, "raw_path": call.path.encode(), "query_string": call.query,
                 "root_path": "", "headers": call.headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
        task = asyncio.ensure_future(self.app(scope, receive, messages.put))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    headers = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                    yield {"status": message["status"], "headers": [*headers, (REPLICA_HEADER, self.replica_id)]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
        finally:  # the client left (Ray cancels this generator) or the response ended
            gone.set()
            await asyncio.gather(task, return_exceptions=True)

    async def metrics(self, call: HTTPCall) -> str:
        return self.models.render_metrics().decode()

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine core is dead or stuck."""
        if problems := self.models.health_problems():
            raise RuntimeError("; ".join(problems))

    def __del__(self) -> None:
        self.models.shutdown()


def _normal_priority() -> None:
    """Ray starts its workers at nice 15, below every ordinary process: under load (a client on the same machine,
    other replicas) the engine then gets the CPU last. Back to 0 for every thread of this process, where allowed."""
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
    except (OSError, AttributeError) as exc:  # no CAP_SYS_NICE, or not Linux
        logger.warning("replica stays at Ray's worker priority (nice %d): %s", os.nice(0), exc)


def ingress_app(replicas: DeploymentHandle) -> FastAPI:
    """The HTTP front, in this process: each request goes to a replica chosen by the deployment's router, its
    response relayed back (one Ray streaming hop per response, no Ray HTTP proxy in the path)."""
    app = FastAPI(title="tokenmill (Ray Serve replicas)", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        if not live.REPLICA_IDS:  # the router starts with the first call through the handle
            await replicas.metrics.remote(HTTPCall("GET", "/metrics", b"", [], b""))
        ids = list(live.REPLICA_IDS)
        texts = await asyncio.gather(*(asyncio.wait_for(replicas.metrics.remote(
            HTTPCall("GET", "/metrics", b"", [], b"", replica=rid)), METRICS_TIMEOUT) for rid in ids),
            return_exceptions=True)
        for rid, text in zip(ids, texts):
            if not isinstance(text, str):
                logger.warning("replica %s gave no metrics: %r", rid, text)
        answered = {rid: text for rid, text in zip(ids, texts) if isinstance(text, str)}
        return Response(merge_expositions(answered), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST", "OPTIONS"])
    async def relay(path: str, request: Request) -> Response:
        body = await request.body()
        text = prompt_text(body) if request.method == "POST" else ""
        call = HTTPCall(request.method, "/" + path, request.url.query.encode(), request.headers.raw, body, text,
                        hashes=block_hashes(text))
        chunks = replicas.options(stream=True).handle.remote(call)
        try:
            start = await chunks.__anext__()
            headers = dict(start["headers"])
            if headers.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(relayed(chunks), status_code=start["status"], headers=headers)
            content = b"".join([chunk async for chunk in chunks])  # whole, so a failure is still a status
        except RayError as exc:
            logger.error("replica failed during %s %s: %s", request.method, request.url.path, exc)
            return error_response(503, f"the engine replica serving this request failed: {type(exc).__name__}")
        headers.pop("content-length", None)
        return Response(content, status_code=start["status"], headers=headers)

    return app


def engine_deployment(app_factory: Callable[[int], FastAPI], replica_set: ReplicaSet):
    return serve.deployment(EngineReplica, name="EngineReplica", **replica_set.deployment_options()).bind(
        app_factory)


def serve_replicas(app_factory: Callable[[int], FastAPI], replica_set: ReplicaSet, *, host: str, port: int,
                   ray_address: str | None) -> None:
    """Start (or join, with `ray_address`) a Ray cluster, deploy the replicas, serve HTTP on host:port from this
    process until SIGINT/SIGTERM, then take the deployment down."""
    ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(proxy_location="Disabled")  # the HTTP front is this process (ingress_app)
        handle = serve.run(engine_deployment(app_factory, replica_set), name=APP_NAME, route_prefix=None)
        logger.info("serving %d replica(s) on http://%s:%d (routing: %s)", replica_set.replicas, host, port,
                    replica_set.routing)
        uvicorn.run(ingress_app(handle), host=host, port=port, log_level="warning")
    finally:
        serve.shutdown()
        ray.shutdown()
