"""The engine core process: LLMEngine's step loop in its own process, talking to the API process over two pipes.

Why a process (as vLLM v1): in one process the HTTP event loop and the step loop share the GIL. A decode step
is hundreds of short torch ops, each of which must take the GIL back, so every millisecond of event-loop Python
(SSE chunks, JSON, tokenizing a new prompt) stalls the step, and a busy event loop can make each re-take wait
for Python's 5 ms switch interval. Here the step loop owns its process's GIL; the API process only tokenizes,
validates and formats.

The core builds its engine itself: `tokenmill serve` forks it before this process has imported torch, so the
core's imports and weight loading overlap the API process's own start (its imports, tokenizer, app), and the
server is ready when the slower of the two is. An engine already built in this process (`lambda: engine`: tests,
the offline API) is forked too, and its weights' pages are then shared copy-on-write (neither side writes them).
Either way the core's first message says it is up (CoreFacts: what the API process needs of the engine) or why it
could not start (CoreStartFailure: the build's own exception, raised again in the API process). This module
imports no torch for that reason. Two GNU OpenMP (libgomp) details:
- A forked child cannot run a parallel region on the thread that forked if that thread had a team (its worker
  threads were not copied: it hangs); a new thread gets a fresh team, so the step loop runs in a new thread.
- libgomp lets idle workers spin between parallel regions only while it manages no more threads than there are
  CPUs; above that they sleep after ~100 spins and every parallel op pays a futex wake-up. The team that built
  the model would still be counted and push the core's own team over that limit (dozens of worker wake-ups per
  decode token; tests/test_async_engine.py checks it), so that team is released before the fork and again after
  a build in the core. The core then waits like `LLM.generate` does.

On the GPU path the core is a thread of the API process instead (CoreThread): a CUDA context does not survive a
fork, and the GPU does the arithmetic, so the GIL is shared with the HTTP loop only for the step's Python.

The messages, one way each, are in engine/messages.py. The engine here emits delta outputs (only what is new
each step), which go to the API process as they are.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from tokenmill.engine.messages import (
    Abort,
    CoreFacts,
    CoreOutputs,
    CoreStartFailure,
    Embedding,
    EmbedRequest,
    EngineCoreRequest,
    RequestDelta,
    RequestFailure,
    Shutdown,
)
from tokenmill.outputs import RequestOutput

if TYPE_CHECKING:  # not imported here: this process may fork the core before importing torch
    from tokenmill.engine.engine import LLMEngine

logger = logging.getLogger("tokenmill.engine")

HEARTBEAT_INTERVAL = 0.5  # seconds between the core's beats; /health allows a few missed ones
PROCESS_BEAT, LOOP_BEAT = 0, 1


@dataclass
class Heartbeat:
    """Two CLOCK_MONOTONIC times the core writes into shared memory: the process beat (a thread of its own,
    stale when the process is stopped or frozen) and the loop beat (each pass of the step loop, and every
    interval while idle; stale when the loop is stuck inside one step)."""

    beats: ctypes.Array

    def beat(self, which: int) -> None:
        self.beats[which] = time.monotonic()

    def age(self, which: int) -> float:
        return time.monotonic() - self.beats[which]


@dataclass
class EngineCoreHandle:
    """The API process's side of a running engine core."""

    process: BaseProcess | CoreThread
    commands: Connection  # send EngineCoreRequest / Abort / Shutdown
    outputs: Connection  # recv_bytes -> pickled CoreOutputs
    heartbeat: Heartbeat


class CoreThread(threading.Thread):
    """The engine core as a thread of this process (the GPU path), with the surface of a process handle."""

    def __init__(self, *args) -> None:
        super().__init__(name="tokenmill-engine-core", daemon=True)
        self.core_args = args
        self.exitcode: int | None = None

    @property
    def pid(self) -> int:
        return os.getpid()

    def run(self) -> None:
        self.exitcode = _core_main(*self.core_args, own_process=False)

    def kill(self) -> None:
        logger.warning("the engine core is a thread of this process: it stops with the process")


def start_engine_core(build: Callable[[], LLMEngine], in_thread: bool = False) -> EngineCoreHandle:
    """Run the engine that `build()` returns in a core process forked now (in_thread: a thread of this process, the
    GPU path); `build` runs in the core (an engine built here is passed as `lambda: engine`). wait_until_up then
    says when the core runs, or raises why it could not start."""
    ctx = multiprocessing.get_context("fork")
    cmd_recv, cmd_send = ctx.Pipe(duplex=False)
    out_recv, out_send = ctx.Pipe(duplex=False)
    heartbeat = Heartbeat(ctx.RawArray(ctypes.c_double, [time.monotonic()] * 2))
    if in_thread:
        thread = CoreThread(build, cmd_recv, out_send, heartbeat, ())
        thread.start()
        return EngineCoreHandle(thread, cmd_send, out_recv, heartbeat)
    process = ctx.Process(target=_core_main, args=(build, cmd_recv, out_send, heartbeat, (cmd_send, out_recv)),
                          name="tokenmill-engine-core", daemon=True)
    gc.freeze()  # the child's collector would otherwise write to every inherited object, copying their pages
    _release_openmp_team()
    process.start()
    process._args = ()  # the child has its copy; this process must not keep an engine (and its model) alive
    cmd_recv.close()  # the child's ends: if this process kept them, the child would never see EOF
    out_send.close()
    return EngineCoreHandle(process, cmd_send, out_recv, heartbeat)


def start_built_engine_core(engine: LLMEngine) -> EngineCoreHandle:
    """The core of an engine built in this process: forked from here (sharing the weights' pages), or a thread of
    this process on the GPU path."""
    return start_engine_core(lambda: engine, in_thread=engine.runner.gpu is not None)


def wait_until_up(handle: EngineCoreHandle) -> CoreFacts:
    """Block until the core's first message: its facts, or the exception its start raised (raised here)."""
    try:
        message = pickle.loads(handle.outputs.recv_bytes())
    except (EOFError, OSError):
        handle.process.join(5.0)
        raise RuntimeError(f"the engine core exited while starting (code {handle.process.exitcode}); its output "
                           "above says why") from None
    if isinstance(message, CoreStartFailure):
        handle.process.join(5.0)
        raise message.error
    return message


def _release_openmp_team() -> None:
    """End this thread's libgomp team (OpenMP 5's omp_pause_resource_all); the next parallel op makes a new one."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:  # not Linux: no libgomp to worry about
        return
    paths = {line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}
    for path in paths:  # torch's own copy; already loaded, so CDLL returns that instance
        try:
            ctypes.CDLL(path).omp_pause_resource_all(2)  # omp_pause_hard
        except (OSError, AttributeError):  # an old libgomp without it: the core's workers just sleep more
            logger.debug("could not release the OpenMP team of %s", path)


def release_freed_memory() -> None:
    """Give the pages of what a start freed back to the OS: parsing a tokenizer's JSON or a GGUF header leaves
    hundreds of MB of freed heap that glibc would otherwise keep for this process."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        logger.debug("malloc_trim is not available")


def stop_engine_core(handle: EngineCoreHandle, timeout: float) -> None:
    """Ask the core to stop (it aborts what is left), wait up to `timeout` s, then kill it. Idempotent."""
    if handle.process.is_alive():
        try:
            handle.commands.send(Shutdown())
        except OSError:  # already going away
            pass
        handle.process.join(timeout)
    if handle.process.is_alive():
        logger.warning("engine core did not stop within %.1f s; killing it", timeout)
        handle.process.kill()
        handle.process.join()


def _core_main(build: Callable[[], LLMEngine], commands: Connection, outputs: Connection, heartbeat: Heartbeat,
               parent_ends: tuple, own_process: bool = True) -> int:
    """The core's life; its exit code (a process exits with it)."""
    for conn in parent_ends:
        conn.close()
    # The API process decides when the engine stops: Ctrl-C (or, once serving, a service manager's SIGTERM) reaches
    # the whole process group, and the server's drain still needs the engine after it. The API process stops this
    # one through the pipe, also at its exit (AsyncEngine registers that), and a vanished parent is an EOF.
    if own_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_beat_forever, args=(heartbeat,), name="tokenmill-heartbeat", daemon=True).start()
    try:
        engine = build()
        engine.delta_outputs = True
        if engine.kv_events is not None:  # bound now, so routers subscribe before the first step
            engine.kv_events.start()
        engine.runner.start()  # in this process: tensor-parallel workers cannot be inherited across a fork
    except Exception as exc:  # the API process raises it (a bad model, a port in use) and exits
        outputs.send_bytes(pickle.dumps(CoreStartFailure(_picklable(exc)), protocol=pickle.HIGHEST_PROTOCOL))
        if own_process:
            sys.exit(1)
        return 1
    if own_process:  # until now a SIGTERM (the API process failing at its own start) ends this one as well
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _release_openmp_team()  # the build's team (see the module docstring)
    release_freed_memory()
    core = EngineCore(engine, outputs, heartbeat)
    heartbeat.beat(LOOP_BEAT)
    outputs.send_bytes(pickle.dumps(CoreFacts.of(engine), protocol=pickle.HIGHEST_PROTOCOL))
    threading.Thread(target=_read_commands, args=(commands, core.inbox), name="tokenmill-commands",
                     daemon=True).start()
    loop = threading.Thread(target=core.run, name="tokenmill-engine")
    loop.start()
    loop.join()
    code = 0 if core.fatal is None else 1
    if own_process and code:
        sys.exit(code)
    return code


def _picklable(exc: Exception) -> Exception:
    """`exc` if it survives the pipe, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # an exception class whose constructor does not take its own args back
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _beat_forever(heartbeat: Heartbeat) -> None:
    while True:
        heartbeat.beat(PROCESS_BEAT)
        time.sleep(HEARTBEAT_INTERVAL)


def _read_commands(commands: Connection, inbox: queue.SimpleQueue) -> None:
    """Pipe -> inbox as commands come, so the API process never blocks on a full pipe during a long step."""
    while True:
        try:
            command = commands.recv()
        except (EOFError, OSError):  # the API process is gone
            command = Shutdown()
        inbox.put(command)
        if isinstance(command, Shutdown):
            return


@dataclass
class EngineCore:
    engine: LLMEngine
    outputs: Connection
    heartbeat: Heartbeat
    inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    sequences_applied: int = 0  # sequences of the requests added so far (the API process counts them)
    fatal: str | None = None

    def run(self) -> None:
        import torch  # here, not at the top: the module stays importable before torch (see the docstring)

        torch.set_num_threads(torch.get_num_threads())  # this new thread's OpenMP team: the engine's --threads
        try:
            while self._apply_commands(block=not self.engine.has_unfinished()):
                self.heartbeat.beat(LOOP_BEAT)
                if self.engine.has_unfinished():
                    self._send(*self._step())
        except BaseException as exc:  # the loop itself broke: the API process fails every stream, /health 503
            logger.exception("engine loop died")
            self.fatal = f"{type(exc).__name__}: {exc}"
            try:
                self._send([], [])
            except Exception:  # stats or the pipe broken too: the API process sees the exit instead
                pass

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command, waiting for one when idle; False once shutdown was asked."""
        outputs: list[RequestOutput] = []
        failures: list[RequestFailure] = []
        embeddings: list[Embedding] = []
        applied = 0
        while True:
            try:
                command = self.inbox.get(block=block and not applied, timeout=HEARTBEAT_INTERVAL)
            except queue.Empty:
                if block and not applied:  # idle: beat, then keep waiting
                    self.heartbeat.beat(LOOP_BEAT)
                    continue
                break
            applied += 1
            if isinstance(command, EngineCoreRequest):
                self.sequences_applied += command.params.num_sequences
                try:
                    self.engine.submit(command)
                except ValueError as exc:  # e.g. a request id already in use
                    failures.append(RequestFailure(command.request_id, "invalid", str(exc)))
            elif isinstance(command, EmbedRequest):
                try:
                    embeddings.append(Embedding(command.request_id,
                                                self.engine.embed(command.prompt_token_ids, command.pooling)))
                except Exception as exc:  # one bad input fails its own request, not the loop
                    logger.exception("embedding failed for request %s", command.request_id)
                    failures.append(RequestFailure(command.request_id, "step", f"{type(exc).__name__}: {exc}"))
            elif isinstance(command, Abort):
                if (final := self.engine.abort(command.request_id)) is not None:
                    outputs.append(final)
            else:
                return False
        if outputs or failures or embeddings or (applied and not self.engine.has_unfinished()):  # else no stats
            self._send(outputs, failures, embeddings)
        return True

    def _step(self) -> tuple[list[RequestOutput], list[RequestFailure]]:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step: abort what was in flight, keep serving
            logger.exception("engine step failed; aborting %d requests", len(self.engine.parents))
            message = f"engine step failed: {type(exc).__name__}: {exc}"
            failures = [RequestFailure(request_id, "step", message) for request_id in self.engine.parents]
            for request_id in list(self.engine.parents):
                self.engine.abort(request_id)
            return [], failures
        # a request the engine ended on its own failure: an error, not a finish
        return ([out for out in outputs if out.error is None],
                [RequestFailure(out.request_id, "step", out.error) for out in outputs if out.error is not None])

    def _send(self, outputs: list[RequestOutput], failures: list[RequestFailure],
              embeddings: list[Embedding] | None = None) -> None:
        message = CoreOutputs([RequestDelta.of(out) for out in outputs], failures,
                              tuple(vars(self.engine.stats()).values()), self.sequences_applied, self.fatal,
                              tuple(embeddings or ()))
        self.outputs.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
