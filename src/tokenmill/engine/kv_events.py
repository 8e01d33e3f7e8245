"""Publishing KV cache events over ZeroMQ as vLLM does (`--kv-events-config`), for KV-aware routers.

Wire format (vLLM's ZmqEventPublisher): a PUB socket at `endpoint` sends, per engine step that changed the prefix
cache, a multipart message [topic, sequence number (8 bytes, big-endian), msgpack payload]; the payload is a
KVEventBatch [timestamp, [event, ...]] with each event tagged and array-like (cache/kv_events.py: wire_format).
With `replay_endpoint`, a ROUTER socket answers a request holding a starting sequence number (8 bytes) with every
batch still buffered from there (the last `buffer_steps`), one [seq, payload] reply each, then [-1, b""] as
vLLM's end marker. The first batch (sequence 0, sent when the engine core starts) is AllBlocksCleared, so a router
forgets what an engine that had the same endpoint held before; a subscriber that connects later gets it by
replay. Sockets live in one background thread of the process that runs the engine steps (the engine core), fed by
a bounded queue (`max_queue_size`: beyond it batches are dropped, and the log says how many).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import Any

from tokenmill.cache.kv_events import AllBlocksCleared, KVCacheEvent, wire_format

logger = logging.getLogger("tokenmill.engine")


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's KVEventsConfig fields and defaults."""

    enable_kv_cache_events: bool = False
    publisher: str = "null"  # "zmq" or "null" (nothing sent, as vLLM's NullEventPublisher)
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def parse(cls, value: dict[str, Any] | str | None) -> KVEventsConfig | None:
        """A dict or its JSON text (the --kv-events-config flag); None, or events not enabled: None."""
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"kv_events_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("kv_events_config must be a JSON object")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(value) - known):
            raise ValueError(f"kv_events_config does not take {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(known))}")
        config = cls(**value)
        if config.publisher not in ("zmq", "null"):
            raise ValueError(f"kv_events_config publisher must be zmq or null, got {config.publisher!r}")
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            if getattr(config, name) < 1:
                raise ValueError(f"kv_events_config {name} must be >= 1, got {getattr(config, name)}")
        return config if config.enable_kv_cache_events else None

    def for_rank(self, rank: int) -> KVEventsConfig:
        """The endpoints of engine `rank` of several (replicas): each TCP port moved up by the rank, as vLLM's
        data-parallel ranks do, so every engine publishes on its own port."""
        return replace(self, endpoint=_port_plus(self.endpoint, rank),
                       replay_endpoint=self.replay_endpoint and _port_plus(self.replay_endpoint, rank))


def _port_plus(endpoint: str, offset: int) -> str:
    host, sep, port = endpoint.rpartition(":")
    if not (endpoint.startswith("tcp://") and sep and port.isdigit()):
        if offset:
            raise ValueError(f"kv_events_config endpoint {endpoint!r}: several engines need tcp://HOST:PORT "
                             "endpoints (each takes PORT + its rank)")
        return endpoint
    return f"{host}:{int(port) + offset}"


class ZmqEventPublisher:
    """Started lazily by the first publish, so in the process that steps the engine (after the core's fork)."""

    def __init__(self, config: KVEventsConfig) -> None:
        try:
            import msgpack  # noqa: F401
            import zmq  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"kv_events_config publisher zmq needs pyzmq and msgpack ({exc}): "
                             "pip install 'tokenmill[distributed]'") from None
        self.config = config
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=config.max_queue_size)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: Exception | None = None

    def start(self) -> None:
        """Bind the sockets and send AllBlocksCleared (sequence 0); idempotent."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise ValueError(f"kv_events_config: cannot open {self.config.endpoint}: {self._error}")
        self.publish([AllBlocksCleared()])

    def publish(self, events: list[KVCacheEvent]) -> None:
        self.start()
        payload = (time.time(), [wire_format(e) for e in events])
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("KV events: %d batches dropped so far (the publisher's queue of %d is full)",
                               self.dropped, self.config.max_queue_size)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(5)

    def _run(self) -> None:
        import msgpack
        import zmq

        context = zmq.Context()
        try:
            pub = context.socket(zmq.PUB)
            pub.set_hwm(self.config.hwm)
            pub.bind(self.config.endpoint)
            replay = None
            if self.config.replay_endpoint:
                replay = context.socket(zmq.ROUTER)
                replay.bind(self.config.replay_endpoint)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        buffer: deque[tuple[int, bytes]] = deque(maxlen=self.config.buffer_steps)
        topic, seq = self.config.topic.encode(), 0
        while True:
            if replay is not None and replay.poll(0):
                self._answer_replay(replay, buffer)
            try:
                item = self._queue.get(timeout=0.01)
            except queue.Empty:
                continue
            if item is None:
                break
            payload = msgpack.packb(list(item))
            pub.send_multipart([topic, seq.to_bytes(8, "big"), payload])
            buffer.append((seq, payload))
            seq += 1
        context.destroy(linger=0)

    @staticmethod
    def _answer_replay(replay, buffer: deque[tuple[int, bytes]]) -> None:
        identity, *frames = replay.recv_multipart()
        start = int.from_bytes(frames[-1], "big")
        for seq, payload in buffer:
            if seq >= start:
                replay.send_multipart([identity, b"", seq.to_bytes(8, "big"), payload])
        replay.send_multipart([identity, b"", (-1).to_bytes(8, "big", signed=True), b""])
