"""One HTTP request's engine work: a request per prompt, started together, read as per-choice deltas, closed together.

The engine streams delta outputs; a Generation passes them on as they come (ChoiceDelta) and keeps each prompt's
whole output (`outputs`), which non-streaming responses, usage, metrics and the request log read.

Completions and chat both run through here, so streaming and non-streaming responses see the same deltas,
and metrics, request logs and aborts happen in one place. Closing a Generation before it finishes aborts
its engine requests at once, which frees their KV blocks (a client that hung up costs nothing more).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from tokenmill.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.params import FieldNames
from tokenmill.server.request_log import log_request
from tokenmill.server.state import ServerState


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # None when the client sent token ids


@dataclass
class ChoiceDelta:
    """What one choice gained since the last delta; `index` is the OpenAI choice index (prompt * n + i)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None


class Generation:
    def __init__(self, state: ServerState, request_id: str, prompts: list[Prompt], params: SamplingParams,
                 priority: int, names: FieldNames, user: str | None = None) -> None:
        self.state = state
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.priority = priority
        self.names = names
        self.user = user
        self.engine_ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        # each prompt's whole output so far, the sum of its delta outputs (empty until the first arrives)
        self.outputs = [RequestOutput(rid, p.text, p.ids, [CompletionOutput(i, "", [], None, None)
                                                           for i in range(params.n)], finished=False)
                        for rid, p in zip(self.engine_ids, prompts)]
        self._finished = [False] * len(prompts)  # metrics recorded and the log line written
        num_choices = len(prompts) * params.n
        self._last_token_time = [0.0] * num_choices  # 0.0: no token yet
        self._done = [False] * num_choices
        self._streams: list[AsyncIterator[RequestOutput]] = []
        self._first: list[RequestOutput] = []
        self._pumps: list[asyncio.Task] = []
        self._closed = False
        self._refused = False  # start() failed: an error response, not an aborted request
        # called with every prompt's final output once all have finished (the result cache stores them)
        self.on_complete: Callable[[list[RequestOutput]], None] | None = None

    async def start(self) -> None:
        """Submit every prompt and wait for each one's first output, so that anything that fails before the
        first token (bad input, full queue, a failed prefill) still becomes an HTTP status, not a broken stream."""
        ae = self.state.async_engine
        try:
            # the whole request, before any prompt queues
            ae.check_capacity(len(self.prompts) * self.params.num_sequences)
        except ValueError as exc:
            raise self.names.error(exc) from None
        self._streams = [ae.generate(rid, p.ids, self.params, self.priority)
                         for rid, p in zip(self.engine_ids, self.prompts)]
        try:
            self._first = await _first_outputs(self._streams)
        except ValueError as exc:
            self._refused = True
            await self.aclose()
            raise self.names.error(exc) from None
        except BaseException as exc:
            self._refused = not isinstance(exc, asyncio.CancelledError)  # cancelled: the client left while waiting
            await self.aclose()
            raise

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Per-choice deltas in arrival order; a choice's last delta carries its finish_reason."""
        n = self.params.n
        async with aclosing(self._merged()) as merged:
            async for p, out in merged:
                now = time.monotonic()
                self._add(self.outputs[p], out)
                deltas = [d for c in out.outputs if (d := self._delta(p * n + c.index, c, now)) is not None]
                if out.finished:
                    self._record(p, self.outputs[p])
                    if self.on_complete is not None and all(self._finished):
                        self.on_complete(self.outputs)
                for delta in deltas:
                    yield delta

    async def run_to_end(self) -> list[RequestOutput]:
        """For non-streaming responses: every prompt's final output."""
        try:
            async with aclosing(self.deltas()) as deltas:
                async for _ in deltas:
                    pass
        finally:
            await self.aclose()
        return self.outputs

    async def aclose(self) -> None:
        """Abort what has not finished (KV blocks are freed now), then release the engine streams. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._pumps:
            task.cancel()
        for p, out in enumerate(self.outputs):  # synchronous: done even if the awaits below get cancelled
            if self._streams and not out.finished:
                self.state.async_engine.abort(self.engine_ids[p])
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for stream in self._streams:
            await stream.aclose()
        for p, out in enumerate(self.outputs):  # aborted, possibly before its first token
            if not self._finished[p] and not self._refused:
                self._record(p, out)

    @staticmethod
    def _add(whole: RequestOutput, delta: RequestOutput) -> None:
        """Fold a delta output into the prompt's whole output."""
        for c in delta.outputs:
            w = whole.outputs[c.index]
            w.text += c.text
            w.token_ids += c.token_ids
            if c.logprobs is not None:
                w.logprobs = (w.logprobs or []) + c.logprobs
            w.cumulative_logprob, w.finish_reason, w.stop_reason = c.cumulative_logprob, c.finish_reason, c.stop_reason
        whole.finished, whole.num_cached_tokens, whole.metrics = delta.finished, delta.num_cached_tokens, delta.metrics
        if delta.prompt_logprobs is not None:
            whole.prompt_logprobs = delta.prompt_logprobs

    def _record(self, p: int, out: RequestOutput) -> None:
        """Metrics and the log line, once per prompt: finished, or aborted as of its last output."""
        self._finished[p] = True
        if out.finished:
            self.state.metrics.observe_finished(out)
        else:
            self.state.metrics.observe_aborted(sum(c.finish_reason is None for c in out.outputs),
                                               sum(len(c.token_ids) for c in out.outputs))
        log_request(out, prompt_text=self.prompts[p].text, log_prompts=self.state.log_prompts, user=self.user)

    def _delta(self, index: int, completion: CompletionOutput, now: float) -> ChoiceDelta | None:
        """`completion` is a delta: what choice `index` gained this step."""
        if self._done[index]:
            return None
        if not completion.token_ids and not completion.text and completion.finish_reason is None:
            return None
        if completion.token_ids:
            if self._last_token_time[index]:
                self.state.metrics.itl.observe(now - self._last_token_time[index])
            self._last_token_time[index] = now
        self._done[index] = completion.finish_reason is not None
        return ChoiceDelta(index, completion.text, completion.token_ids, completion.logprobs,
                           completion.finish_reason, completion.stop_reason)

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from all engine streams; one prompt needs no tasks or queue."""
        if len(self._streams) == 1:
            yield 0, self._first[0]
            async for out in self._streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        self._pumps = [asyncio.create_task(self._pump(p, queue)) for p in range(len(self._streams))]
        pending = len(self._pumps)
        while pending:
            p, item = await queue.get()
            if item is None:
                pending -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield p, item

    async def _pump(self, p: int, queue: asyncio.Queue) -> None:
        try:
            queue.put_nowait((p, self._first[p]))
            async for out in self._streams[p]:
                queue.put_nowait((p, out))
            queue.put_nowait((p, None))
        except Exception as exc:  # EngineStepError and the like: the consumer raises it
            queue.put_nowait((p, exc))


async def _first_outputs(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    if len(streams) == 1:
        return [await anext(streams[0])]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_next(s)) for s in streams]
    except BaseExceptionGroup as errors:  # one prompt failed: the group has cancelled the others
        raise errors.exceptions[0] from None
    return [t.result() for t in tasks]


async def _next(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    return await anext(stream)
