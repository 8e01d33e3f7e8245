"""AsyncEngine: the API process's view of the engine core process, with an asyncio stream per request.

The step loop runs in its own process (engine/core_proc.py says why). Here, in the event loop's thread, the
input processor tokenizes and validates (this process holds no model), commands go down a pipe, and the core's
per-step message is read as soon as the pipe is readable (`loop.add_reader`: no extra thread, so nothing
here competes for this process's GIL either). Each request's stream yields delta outputs, as the core sends
them: only what is new (vLLM's DELTA output kind); the consumer keeps what it needs of the whole.
"""
from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.util import Finalize
from typing import TYPE_CHECKING

from tokenmill.engine.core_proc import (
    HEARTBEAT_INTERVAL,
    LOOP_BEAT,
    PROCESS_BEAT,
    EngineCoreHandle,
    start_built_engine_core,
    stop_engine_core,
    wait_until_up,
)
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.messages import Abort, CoreOutputs, EmbedRequest, RequestDelta
from tokenmill.engine.stats import SchedulerStats
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:  # the API process never imports torch (engine/core_proc.py says why)
    from tokenmill.engine.engine import LLMEngine

logger = logging.getLogger("tokenmill.engine")
# /health turns 503 when the core process missed this many seconds of beats (stopped, frozen), or when its
# step loop has been inside one step this long (stuck: no real step on a CPU takes minutes).
PROCESS_STALL_SECONDS = 6 * HEARTBEAT_INTERVAL
LOOP_STALL_SECONDS = 120.0


class QueueFullError(Exception):
    """More requests are waiting than `max_waiting` allows; the client should retry later."""


class EngineDeadError(Exception):
    """The step loop has stopped; no request can be served."""


class EngineStepError(Exception):
    """A step failed; the requests in it were aborted, the engine keeps serving others."""


@dataclass
class _Stream:
    """One request's queue of delta outputs."""

    prompt: str | None
    prompt_token_ids: list[int]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def output(self, delta: RequestDelta) -> RequestOutput:
        return RequestOutput(delta.request_id, self.prompt, self.prompt_token_ids,
                             [s.completion() for s in delta.sequences], delta.finished, delta.num_cached_tokens,
                             delta.metrics, prompt_logprobs=delta.prompt_logprobs)


class AsyncEngine:
    def __init__(self, core: EngineCoreHandle, tokenizer: Tokenizer, max_waiting: int | None = None,
                 on_dead: Callable[[str], None] | None = None) -> None:
        """Serve a started engine core (core_proc.start_engine_core), waiting until it is up (or raising why it
        could not start); `tokenizer` is this process's, for the input processor. on_dead(reason) runs once, in
        the event loop, when the core process exits or its loop dies."""
        try:
            facts = wait_until_up(core)
        except BaseException:
            stop_engine_core(core, 5.0)
            raise
        self.input_processor = InputProcessor(tokenizer, facts.max_model_len, facts.vocab_size, facts.hidden_size)
        self.max_waiting = max_waiting
        self.on_dead = on_dead
        self.stats = SchedulerStats(*facts.stats)
        self.cache_info = facts.cache_info
        self._streams: dict[str, _Stream] = {}
        self._fatal: str | None = None
        self._stopping = False
        self._sequences_sent = 0  # sequences (n per request) sent to the core; it reports how many it applied
        self._sequences_applied = 0
        self._send_lock = threading.Lock()  # shutdown() may run in another thread than the handlers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core = core
        # Stop the core when this object goes away or the interpreter exits, before multiprocessing joins its
        # children at exit (the core ignores SIGTERM, so that join would otherwise wait forever).
        self._finalizer = Finalize(self, stop_engine_core, args=(self._core, 5.0), exitpriority=10)
        logger.info("engine core running in process %d", self.core_pid)

    @classmethod
    def of_engine(cls, engine: LLMEngine, max_waiting: int | None = None,
                  on_dead: Callable[[str], None] | None = None) -> AsyncEngine:
        """Serve an engine built in this process: its core is forked from here (sharing the weights' pages) and
        the caller may drop the engine."""
        return cls(start_built_engine_core(engine), engine.tokenizer, max_waiting, on_dead)

    @property
    def is_alive(self) -> bool:
        return self._fatal is None and self._core.process.is_alive()

    def health_problem(self) -> str | None:
        """Why this engine cannot serve now (dead, stopped, stuck), or None."""
        if not self.is_alive:
            return self._dead_message()
        beat = self._core.heartbeat
        if (age := beat.age(PROCESS_BEAT)) > PROCESS_STALL_SECONDS:
            return f"the engine core process has not answered for {age:.1f} s (stopped or frozen)"
        if (age := beat.age(LOOP_BEAT)) > LOOP_STALL_SECONDS:
            return f"the engine step loop has been stuck for {age:.1f} s"
        return None

    @property
    def core_pid(self) -> int:
        return self._core.process.pid

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's delta outputs step by step; leaving the iterator early aborts the request."""
        self.attach()
        self.check_capacity(params.num_sequences)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = self.input_processor.process(request_id, prompt, params, priority)  # ValueError on bad input
        stream = _Stream(request.prompt, request.prompt_token_ids)
        self._streams[request_id] = stream
        finished = False
        try:
            self._send(request)
            self._sequences_sent += params.num_sequences
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

    async def embed(self, request_id: str, prompt: str | Sequence[int], pooling: str = "mean") -> list[float]:
        """The prompt's embedding (LLMEngine.embed), computed by the core between its steps."""
        self.attach()
        if not self.is_alive:
            raise EngineDeadError(self._dead_message())
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.input_processor.prompt(prompt)  # ValueError on bad input
        stream = self._streams[request_id] = _Stream(text, ids)
        try:
            self._send(EmbedRequest(request_id, ids, pooling))
            item = await stream.queue.get()
            if isinstance(item, Exception):
                raise item
            return item
        finally:
            self._streams.pop(request_id, None)

    def check_capacity(self, num_sequences: int) -> None:
        """Raise unless `num_sequences` new sequences may queue now: each sequence counts against max_waiting, so
        one request with a large n cannot fill the queue that every other client shares."""
        if not self.is_alive:
            raise EngineDeadError(self._dead_message())
        if self.max_waiting is None:
            return
        if num_sequences > self.max_waiting:
            raise ValueError(f"n asks for {num_sequences} sequences in one request, more than the server ever queues "
                             f"(max_waiting={self.max_waiting})")
        waiting = self.stats.num_waiting + self._sequences_sent - self._sequences_applied
        if waiting + num_sequences > self.max_waiting:
            raise QueueFullError(f"{waiting} sequences are already waiting and this request adds {num_sequences} "
                                 f"(max_waiting={self.max_waiting})")

    def abort(self, request_id: str) -> None:
        if self.is_alive:
            try:
                self._send(Abort(request_id))
            except EngineDeadError:  # nothing left to abort
                pass

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
        """Stop the core process (it aborts what is left); safe to call twice and from any thread."""
        with self._send_lock:
            self._stopping = True  # from now on no command goes down the pipe but the core's SHUTDOWN
        self._finalizer.cancel()
        stop_engine_core(self._core, timeout)

    def _send(self, command: object) -> None:
        with self._send_lock:
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            try:
                self._core.commands.send(command)
            except OSError as exc:  # the core is gone; the output reader reports why
                raise EngineDeadError(self._dead_message()) from exc

    def attach(self) -> None:
        """Read the core's outputs on the running event loop (the one that serves the streams); the server calls
        it at startup, so a core that dies before any request is noticed too."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            if self._loop.is_running():
                raise RuntimeError("this AsyncEngine already serves another running event loop")
            self._loop.remove_reader(self._core.outputs.fileno())
        loop.add_reader(self._core.outputs.fileno(), self._on_outputs)
        self._loop = loop

    def _on_outputs(self) -> None:
        """One message per call: the selector calls again while the pipe has more (no poll() per message)."""
        conn = self._core.outputs
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            self._loop.remove_reader(conn.fileno())
            if not self._stopping and self._fatal is None:
                self._core.process.join(1.0)  # it closed its pipe: it is exiting, reap it for the exit code
                self._fatal = f"the engine core process exited (code {self._core.process.exitcode})"
                logger.error(self._fatal)
            self._died()
            return
        self._dispatch(pickle.loads(message))

    def _dispatch(self, message: CoreOutputs) -> None:
        self.stats = SchedulerStats(*message.stats)
        self._sequences_applied = message.sequences_applied
        for delta in message.deltas:
            if (stream := self._streams.get(delta.request_id)) is not None:
                stream.queue.put_nowait(stream.output(delta))
        for request_id, vector in message.embeddings:
            if (stream := self._streams.get(request_id)) is not None:
                stream.queue.put_nowait(vector)
        for request_id, kind, text in message.failures:
            if (stream := self._streams.get(request_id)) is not None:
                stream.queue.put_nowait(ValueError(text) if kind == "invalid" else EngineStepError(text))
        if message.fatal is not None:
            self._fatal = f"engine loop died: {message.fatal}"
            self._died()

    def _died(self) -> None:
        """Fail every stream; tell the owner once (the server exits so that a supervisor restarts it)."""
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(self._dead_message()))
        if self.on_dead is not None and not self._stopping:
            on_dead, self.on_dead = self.on_dead, None
            on_dead(self._dead_message())

    def _dead_message(self) -> str:
        return f"the engine loop is not running ({self._fatal})" if self._fatal else "the engine loop is not running"
