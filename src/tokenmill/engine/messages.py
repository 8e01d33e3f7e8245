"""What crosses the pipe between the API process and the engine core process, one way each.

In: EngineCoreRequest, EmbedRequest, Abort, Shutdown. Out: first CoreFacts (the core is up) or CoreStartFailure,
then once per step CoreOutputs, with a RequestDelta per request that advanced, holding only what is new (so a
message stays small however long the sequences grow), and the embeddings computed since the last. NamedTuples:
typed, and they pickle nearly as cheaply as bare tuples, which matters when steps take milliseconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from tokenmill.config import CacheInfo
from tokenmill.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:  # the API process, which reads these messages, imports no torch
    from tokenmill.engine.engine import LLMEngine


@dataclass
class EngineCoreRequest:
    """What crosses into the engine core: a validated request, its prompt already tokenized."""

    request_id: str
    prompt: str | None  # the text, when the client sent text
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped by the context
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)  # CLOCK_MONOTONIC: the same in both processes
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()  # params.bad_words, tokenized (the core never encodes)


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


class CoreFacts(NamedTuple):
    """The core's first message: its engine is built and running, and what the API process needs of it."""

    max_model_len: int
    vocab_size: int
    hidden_size: int
    stats: tuple  # SchedulerStats' fields, in order
    cache_info: CacheInfo

    @classmethod
    def of(cls, engine: LLMEngine) -> CoreFacts:
        p = engine.input_processor
        return cls(p.max_model_len, p.vocab_size, p.hidden_size, tuple(vars(engine.stats()).values()),
                   engine.kv_cache.info)


class CoreStartFailure(NamedTuple):
    """The core's first message when its engine could not be built or started: the exception, raised again in the
    API process (as a RuntimeError naming it where it does not pickle)."""

    error: Exception
