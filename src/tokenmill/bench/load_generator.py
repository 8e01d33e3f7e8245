"""The load generator: sends requests to any OpenAI-compatible server on an arrival schedule and times each stream.

Arrivals are Poisson at --request-rate (exponential gaps from a seeded RNG) or all at once (rate inf); either way
at most --max-concurrency requests are in flight, so rate inf + a concurrency limit is a closed loop. Every
response is streamed (SSE) with `stream_options.include_usage`, so token counts are the server's own. A request
fails on an HTTP error, a stream that breaks or ends without [DONE] (or, for a backend that sends no [DONE],
ends without usage), an error event, or a missing usage block.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from tokenmill.bench import BenchError
from tokenmill.bench.backends import Backend, get_backend
from tokenmill.bench.datasets import SampleRequest
from tokenmill.bench.metrics import RequestRecord

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
WARMUP_PROMPT = "Say hello in one short sentence."  # not from the dataset: it must not warm a measured prefix


@dataclass
class ServeConfig:
    base_url: str
    endpoint: str = "completions"  # "completions" | "chat"
    backend: str = "openai"  # the server's dialect, a key of backends.BACKENDS
    model: str | None = None  # None: the first model the server lists
    request_rate: float = math.inf  # requests / s; inf sends them all at once
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None
    timeout_s: float = 600.0
    num_warmups: int = 1
    progress: bool = True


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # first send to last request's end
    model: str


def api_root(base_url: str) -> str:
    """'http://h:p', 'http://h:p/' and 'http://h:p/v1' all name the same server."""
    return base_url.rstrip("/").removesuffix("/v1")


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times from the start, in seconds: a Poisson process at `rate`, or all zero when rate is inf."""
    if not rate > 0:
        raise BenchError(f"--request-rate must be > 0 or inf, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng, now, offsets = random.Random(seed), 0.0, []
    for _ in range(n):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


def request_body(config: ServeConfig, model: str, request: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": request.output_len, "temperature": config.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if config.endpoint == "chat":
        system = [{"role": "system", "content": request.system}] if request.system else []
        body["messages"] = [*system, {"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = f"{request.system}\n\n{request.prompt}" if request.system else request.prompt
    if config.ignore_eos:
        body |= get_backend(config.backend).ignore_eos_fields(config.temperature)
    return body


def _content(choice: dict[str, Any], endpoint: str) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def _read_stream(response: httpx.Response, record: RequestRecord, endpoint: str, backend: Backend,
                       sent: float) -> None:
    """Time the content chunks and read usage; on return the record says success or what went wrong."""
    usage = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            record.latency = time.perf_counter() - sent
            break
        now = time.perf_counter() - sent
        chunk = json.loads(data)
        if chunk.get("error"):
            record.error = f"error event: {json.dumps(chunk['error'])[:300]}"
            return
        choices = chunk.get("choices") or []
        if any(_content(c, endpoint) for c in choices):
            record.chunk_times.append(now)
        for choice in choices:
            record.finish_reason = choice.get("finish_reason") or record.finish_reason
        usage = chunk.get("usage") or usage
    if record.latency is None and not backend.ends_with_done and usage:
        record.latency = time.perf_counter() - sent  # the body ended cleanly after its usage chunk
    if record.latency is None:
        record.error = f"broken stream: it ended before {'[DONE]' if backend.ends_with_done else 'its usage'}"
    elif not usage or usage.get("completion_tokens") is None:
        record.error = "missing usage: the stream had no usage block (stream_options.include_usage)"
    else:
        record.prompt_tokens, record.completion_tokens = usage.get("prompt_tokens"), usage["completion_tokens"]
        record.success = True


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any], record: RequestRecord,
               config: ServeConfig, run_start: float) -> None:
    sent = time.perf_counter()
    record.send_time = sent - run_start
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {detail[:300]}"
                return
            await _read_stream(response, record, config.endpoint, get_backend(config.backend), sent)
    except httpx.TimeoutException as exc:
        record.error = f"timeout: {type(exc).__name__}"
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: a data line that is not JSON
        record.error = f"broken stream: {type(exc).__name__}: {exc}"


async def resolve_model(client: httpx.AsyncClient, root: str) -> str:
    """The first model id the server lists at /v1/models, as `vllm bench serve` does without --model."""
    try:
        response = await client.get(f"{root}/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise BenchError(f"could not read a model id from {root}/v1/models ({type(exc).__name__}: {exc}); "
                         "is the server up? pass --model NAME") from exc


def _client(config: ServeConfig, connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # trust_env=False: a proxy from the environment would sit inside every measured latency.
    return httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(config.timeout_s), trust_env=False,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def run_async(config: ServeConfig, requests: list[SampleRequest]) -> RunResult:
    if config.endpoint not in ENDPOINTS:
        raise BenchError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {config.endpoint!r}")
    get_backend(config.backend)  # an unknown one fails here, before any request
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be >= 1, got {config.max_concurrency}")
    offsets = arrival_offsets(len(requests), config.request_rate, config.seed)
    root, url = api_root(config.base_url), api_root(config.base_url) + ENDPOINTS[config.endpoint]
    async with _client(config, config.max_concurrency or len(requests)) as client:
        model = config.model or await resolve_model(client, root)
        for _ in range(config.num_warmups):
            warm = RequestRecord(index=-1, max_tokens=8)
            await send(client, url, request_body(config, model, SampleRequest(WARMUP_PROMPT, 8)), warm, config,
                       time.perf_counter())
            if not warm.success:
                raise BenchError(f"the warm-up request to {url} failed: {warm.error}")
        limit = asyncio.Semaphore(config.max_concurrency or len(requests))
        records = [RequestRecord(i, r.output_len, r.prompt_len) for i, r in enumerate(requests)]
        with tqdm(total=len(requests), desc="requests", unit="req", disable=not config.progress) as bar:
            run_start = time.perf_counter()

            async def one(request: SampleRequest, record: RequestRecord, offset: float) -> None:
                await asyncio.sleep(max(0.0, run_start + offset - time.perf_counter()))
                async with limit:
                    await send(client, url, request_body(config, model, request), record, config, run_start)
                bar.update(1)

            await asyncio.gather(*(one(r, rec, t) for r, rec, t in zip(requests, records, offsets)))
            duration = time.perf_counter() - run_start
    return RunResult(records, duration, model)


def run(config: ServeConfig, requests: list[SampleRequest]) -> RunResult:
    return asyncio.run(run_async(config, requests))
