"""Result cache: a deterministic request seen before is answered from its stored outputs, without the engine.

Only requests whose output is a function of the request are cached: greedy ones (temperature 0) and those with a
`seed`. The key is a SHA-256 of the model's identity (served name, checkpoint, tokenmill version, the engine
options its outputs depend on: EngineArgs.output_identity) and the request body in canonical JSON, less the
fields that change only the response's framing (`stream`, `stream_options`): a streamed request replays a
non-streamed one's result and the other way round, because what is stored are the engine's outputs (text, token
ids, logprobs, finish reasons), which the endpoint's own formatter turns into a response exactly as it does for
fresh ones. `Cache-Control: no-cache` on a request
skips the lookup (the fresh result is stored); `no-store` skips both.

Stores: an in-process LRU (`memory`), or Redis (`redis://HOST:PORT[/DB]`), shared by every server that points at
it. Both expire entries after `ttl` seconds and hold at most `max_entries` (Redis keeps an index sorted by
insertion time and trims the oldest). A Redis that cannot be reached costs one warning in the log and a short
pause (`RETRY_AFTER`), during which requests run uncached; the first good call after it logs the recovery.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel
from starlette.requests import Request

from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from tokenmill.server.generation import ChoiceDelta, Generation

if TYPE_CHECKING:
    from tokenmill.server.state import ServerState

logger = logging.getLogger("tokenmill.server")
FORMAT = 1  # the stored layout's version, part of every key: a new layout never reads an old entry
RETRY_AFTER = 1.0  # seconds without store calls after one failed
_FRAMING_FIELDS = {"stream", "stream_options"}


class Store(Protocol):
    errors: tuple[type[BaseException], ...]  # what a call raises when the store is unreachable

    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes) -> None: ...


class MemoryStore:
    """An LRU dict in this process; entries older than `ttl` are misses (and dropped when met)."""

    errors: tuple[type[BaseException], ...] = ()

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        if (entry := self._entries.get(key)) is None:
            return None
        if time.monotonic() - entry[0] > self.ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    async def put(self, key: str, value: bytes) -> None:
        self._entries[key] = (time.monotonic(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class RedisStore:
    """Entries under `tokenmill:result:<key>` with Redis's own expiry; `tokenmill:results` indexes them by
    insertion time, so the count stays within `max_entries` across every server sharing the Redis."""

    PREFIX = "tokenmill:result:"
    INDEX = "tokenmill:results"

    def __init__(self, url: str, ttl: float, max_entries: int) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.exceptions import RedisError
        except ImportError:
            raise ValueError("--result-cache redis:// needs the redis client: pip install 'tokenmill[distributed]'") \
                from None
        self.errors = (RedisError, OSError)
        self.ttl = ttl
        self.max_entries = max_entries
        self.client = aioredis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(self.PREFIX + key)

    async def put(self, key: str, value: bytes) -> None:
        now = time.time()
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.PREFIX + key, value, px=int(self.ttl * 1000))
            pipe.zadd(self.INDEX, {key: now})
            pipe.zremrangebyscore(self.INDEX, 0, now - self.ttl)  # expired: their values are gone already
            pipe.zcard(self.INDEX)
            count = (await pipe.execute())[-1]
        if count > self.max_entries:
            oldest = await self.client.zpopmin(self.INDEX, count - self.max_entries)
            await self.client.delete(*(self.PREFIX + k.decode() for k, _ in oldest))


def open_store(url: str, ttl: float, max_entries: int) -> Store:
    """`memory` or `redis://HOST:PORT[/DB]` (also `rediss://`, `unix://`): the --result-cache value."""
    if ttl <= 0:
        raise ValueError(f"--result-cache-ttl must be > 0 seconds, got {ttl}")
    if max_entries < 1:
        raise ValueError(f"--result-cache-max-entries must be >= 1, got {max_entries}")
    if url == "memory":
        return MemoryStore(ttl, max_entries)
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return RedisStore(url, ttl, max_entries)
    raise ValueError(f"--result-cache must be 'memory' or a Redis URL (redis://HOST:PORT[/DB]), got {url!r}")


class ResultCache:
    """The policy (what is cached, under which key) over a Store, with the store's outages kept out of requests."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name  # for the log: "memory" or the Redis URL
        self._down_until = 0.0  # monotonic time; > now: the store failed lately, requests skip it
        self._down = False
        self._writes: set[asyncio.Task] = set()  # stores in flight (held so they are not collected mid-way)

    def key(self, state: ServerState, request: Request, body: BaseModel, greedy_or_seeded: bool) -> CacheKey | None:
        """The request's key, or None when it must not be cached (sampled without a seed, or `no-store`)."""
        directives = {d.strip().lower() for d in request.headers.get("cache-control", "").split(",")}
        if not greedy_or_seeded or "no-store" in directives:
            return None
        identity = {"format": FORMAT, "version": _version(), "model": state.served_model_name,
                    "root": state.model_root, "engine": state.identity, "endpoint": request.url.path,
                    "body": body.model_dump(mode="json", exclude=_FRAMING_FIELDS | {"model"})}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        return CacheKey(digest, read="no-cache" not in directives)

    async def lookup(self, key: CacheKey) -> list[RequestOutput] | None:
        if not key.read:
            return None
        value = await self._call(self.store.get(key.digest))
        return None if value is None else decode_outputs(value)

    def save(self, key: CacheKey, outputs: list[RequestOutput]) -> None:
        """Store finished outputs in the background (the response does not wait for the store)."""
        if any(o.error is not None or any(c.finish_reason in (None, "abort") for c in o.outputs) for o in outputs):
            return
        task = asyncio.ensure_future(self._call(self.store.put(key.digest, encode_outputs(outputs))))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _call(self, call):
        if time.monotonic() < self._down_until:
            call.close()
            return None
        try:
            result = await call
        except self.store.errors as exc:
            self._down_until = time.monotonic() + RETRY_AFTER
            if not self._down:
                logger.warning("result cache %s is unavailable (%s); serving without it until it answers again",
                               self.name, exc)
            self._down = True
            return None
        if self._down:
            logger.info("result cache %s answers again", self.name)
            self._down = False
        return result


@dataclass(frozen=True)
class CacheKey:
    digest: str
    read: bool = True  # False: Cache-Control no-cache (store the fresh result, do not answer from the cache)


class Replay:
    """A cached result in a Generation's shape, so `respond` and the endpoint's formatter treat it as a fresh one:
    each choice arrives as one delta holding all of its text."""

    def __init__(self, generation: Generation, outputs: list[RequestOutput]) -> None:
        self.request_id = generation.request_id
        self.outputs = outputs
        self.n = generation.params.n
        for rid, out in zip(generation.engine_ids, outputs):
            out.request_id = rid

    async def start(self) -> None:
        pass

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        for p, out in enumerate(self.outputs):
            for c in out.outputs:
                yield ChoiceDelta(p * self.n + c.index, c.text, c.token_ids, c.logprobs, c.finish_reason,
                                  c.stop_reason)

    async def run_to_end(self) -> list[RequestOutput]:
        return self.outputs

    async def aclose(self) -> None:
        pass


def encode_outputs(outputs: list[RequestOutput]) -> bytes:
    """JSON, not pickle: a value read back from a shared Redis must not be able to run code here."""
    return json.dumps([{
        "prompt": o.prompt, "prompt_token_ids": o.prompt_token_ids, "num_cached_tokens": o.num_cached_tokens,
        "prompt_logprobs": None if o.prompt_logprobs is None else [_encode_logprobs(e) for e in o.prompt_logprobs],
        "outputs": [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                     "cumulative_logprob": c.cumulative_logprob, "finish_reason": c.finish_reason,
                     "stop_reason": c.stop_reason,
                     "logprobs": None if c.logprobs is None else [_encode_logprobs(e) for e in c.logprobs]}
                    for c in o.outputs]} for o in outputs]).encode()


def decode_outputs(value: bytes) -> list[RequestOutput]:
    return [RequestOutput(
        request_id="", prompt=o["prompt"], prompt_token_ids=o["prompt_token_ids"], finished=True,
        num_cached_tokens=o["num_cached_tokens"],
        prompt_logprobs=None if o["prompt_logprobs"] is None else [_decode_logprobs(e) for e in o["prompt_logprobs"]],
        outputs=[CompletionOutput(c["index"], c["text"], c["token_ids"], c["cumulative_logprob"],
                                  None if c["logprobs"] is None else [_decode_logprobs(e) for e in c["logprobs"]],
                                  c["finish_reason"], c["stop_reason"]) for c in o["outputs"]])
        for o in json.loads(value)]


def _encode_logprobs(entry: TokenLogprobs | None) -> list | None:
    return None if entry is None else [[t, lp.logprob, lp.rank, lp.decoded_token] for t, lp in entry.items()]


def _decode_logprobs(entry: list | None) -> TokenLogprobs | None:
    return None if entry is None else {t: Logprob(logprob, rank, text) for t, logprob, rank, text in entry}


def _version() -> str:
    try:
        return importlib.metadata.version("tokenmill")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
