"""AsyncEngine: the engine's step loop on a background thread, with an asyncio stream per request.

Why a thread and not a process: the model's matmuls release the GIL, so HTTP handling runs while a
step computes, and a thread shares the tokenizer and the weights without copies or IPC. Handlers only
tokenize/validate (process_request) and enqueue commands; the loop thread is the only one that touches
the engine's state, so nothing needs a lock around a whole step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.scheduler import SchedulerStats
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill.engine")


class QueueFullError(Exception):
    """More requests are waiting than `max_waiting` allows; the client should retry later."""


class EngineDeadError(Exception):
    """The step loop has stopped; no request can be served."""


class EngineStepError(Exception):
    """A step failed; the requests in it were aborted, the engine keeps serving others."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | Exception | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._fatal: BaseException | None = None
        self.stats: SchedulerStats = engine.stats()
        self.last_step_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._fatal is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs step by step; leaving the iterator early aborts the request."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        if self.max_waiting is not None and self.stats.num_waiting + self._commands.qsize() >= self.max_waiting:
            raise QueueFullError(f"{self.stats.num_waiting} requests are already waiting (max_waiting={self.max_waiting})")
        parent = self.engine.process_request(request_id, prompt, params, priority)  # raises ValueError on bad input
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._send(("add", parent))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def drain(self, timeout: float) -> int:
        """Let in-flight requests finish for up to `timeout` seconds, then abort the rest; returns how many."""
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self.is_alive:
            await asyncio.sleep(0.05)
        left = list(self._streams)
        for request_id in left:
            self.abort(request_id)
        return len(left)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.submit(payload)
                except ValueError as exc:  # e.g. a duplicate request id
                    stream = self._streams.get(payload.request_id)
                    if stream is not None:
                        stream.put(exc)
            else:
                final = self.engine.abort(payload)
                stream = self._streams.get(payload)
                if final is not None and stream is not None:
                    stream.put(final)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished():
                    self.stats = self.engine.stats()  # aborts change stats without a step
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    self.last_step_time = time.monotonic()
                    continue
                self._step()
        except BaseException as exc:  # the loop itself broke: fail every stream, /health turns red
            self._fatal = exc
            logger.exception("engine loop died")
            for stream in list(self._streams.values()):
                stream.put(EngineDeadError(f"engine loop died: {exc}"))
        finally:
            for request_id in list(self.engine.parents):
                self.engine.abort(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step: abort what was in flight, keep serving
            logger.exception("engine step failed; aborting %d requests", len(self.engine.parents))
            for request_id in list(self.engine.parents):
                self.engine.abort(request_id)
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put(EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}"))
            outputs = []
        self.stats = self.engine.stats()
        self.last_step_time = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
