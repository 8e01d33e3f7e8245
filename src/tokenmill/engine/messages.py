"""What crosses the pipe between the API process and the engine core process, one way each.

In: EngineCoreRequest (engine/input_processor.py), EmbedRequest, Abort, Shutdown. Out, once per step: CoreOutputs,
with a RequestDelta per request that advanced, holding only what is new (so a message stays small however long the
sequences grow), and the embeddings computed since the last. NamedTuples: typed, and they pickle nearly as cheaply
as bare tuples, which matters when steps take milliseconds.
"""
from __future__ import annotations

from typing import NamedTuple

from tokenmill.outputs import CompletionOutput, RequestOutput, TokenLogprobs


class EmbedRequest(NamedTuple):
    """A prompt to embed (its final hidden states pooled), computed between steps."""

    request_id: str
    prompt_token_ids: list[int]
    pooling: str  # "mean" | "last"


class Embedding(NamedTuple):
    request_id: str
    vector: list[float]


class Abort(NamedTuple):
    request_id: str


class Shutdown(NamedTuple):
    """Abort what is left and exit."""


class SequenceDelta(NamedTuple):
    index: int
    token_ids: list[int]  # new this step
    text: str  # new this step (text held back for a possible stop string comes later, or never)
    logprobs: list[TokenLogprobs] | None  # new this step, when asked for
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None

    @classmethod
    def of(cls, c: CompletionOutput) -> SequenceDelta:
        return cls(c.index, c.token_ids, c.text, c.logprobs, c.cumulative_logprob, c.finish_reason, c.stop_reason)

    def completion(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, self.token_ids, self.cumulative_logprob, self.logprobs,
                                self.finish_reason, self.stop_reason, self.text)


class RequestDelta(NamedTuple):
    request_id: str
    finished: bool
    num_cached_tokens: int
    metrics: dict[str, float]
    sequences: list[SequenceDelta]  # the sequences that advanced
    prompt_logprobs: list[TokenLogprobs | None] | None  # in the request's first delta only

    @classmethod
    def of(cls, out: RequestOutput) -> RequestDelta:
        return cls(out.request_id, out.finished, out.num_cached_tokens, out.metrics,
                   [SequenceDelta.of(c) for c in out.outputs], out.prompt_logprobs)


class RequestFailure(NamedTuple):
    request_id: str
    kind: str  # "invalid" (refused before it ran) | "step" (failed while running)
    message: str


class CoreOutputs(NamedTuple):
    deltas: list[RequestDelta]
    failures: list[RequestFailure]
    stats: tuple  # SchedulerStats' fields, in order
    sequences_applied: int  # sequences of the requests added so far (the API process counts them for backpressure)
    fatal: str | None  # why the step loop died, or None
    embeddings: tuple[Embedding, ...] = ()
