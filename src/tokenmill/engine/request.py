"""Request state as the engine tracks it: token ids, how many are computed, stop decisions, timestamps.

One Request is one sequence; `n > 1` fans out into several Requests (engine/parent_request.py).
"""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.structured_output import GrammarMatcher
from tokenmill.model.sampler import NO_RULES, SampledToken, TokenRules
from tokenmill.outputs import CompletionOutput, Logprob, TokenLogprobs
from tokenmill.sampling_params import SamplingParams


def token_logprobs(sampled: SampledToken, decode_token: Callable[[int], str]) -> TokenLogprobs:
    """A token's logprob entry: its top alternatives and itself, each with its rank and text."""
    entry = {tid: Logprob(lp, rank + 1, decode_token(tid)) for rank, (tid, lp) in enumerate(sampled.top)}
    entry[sampled.token_id] = Logprob(sampled.logprob, sampled.rank, decode_token(sampled.token_id))
    return entry


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped by the context length and the KV capacity
    stop_token_ids: set[int]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    rules: TokenRules = NO_RULES  # min_tokens and bad words
    grammar: GrammarMatcher | None = None  # structured output
    priority: int = 0  # lower runs first, as in vLLM
    index: int = 0  # which of the parent's n completions
    parent_id: str = ""  # the user's request id (equal to request_id when n == 1)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + output so far
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hash chain of full blocks
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    num_preemptions: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # speculated continuation, verified this step
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    _num_emitted: int = 0  # output tokens handed out in completions so far

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sort_key(self) -> tuple[int, float]:
        """Scheduling order: priority first, then arrival (FCFS)."""
        return (self.priority, self.arrival_time)

    def record(self, sampled: SampledToken, decode_token: Callable[[int], str]) -> None:
        """Append a sampled token and decide whether it ends the request."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_ids.append(sampled.token_id)
        self.cumulative_logprob += sampled.logprob
        if self.params.logprobs is not None:
            self.logprobs.append(token_logprobs(sampled, decode_token))
        if sampled.token_id in self.stop_token_ids:
            # as vLLM: stop_reason names a stop token the request asked for, None for the model's own end tokens
            self.finish(now, "stop", sampled.token_id if sampled.token_id in self.params.stop_token_ids else None)
            return
        self.detokenizer.add(sampled.token_id)
        if self.grammar is not None and not self.grammar.accept(sampled.token_id):
            self.finish(now, "abort")  # only if the mask was not applied: never in normal operation
        elif self.detokenizer.stopped_by is not None:
            self.finish(now, "stop", self.detokenizer.stopped_by)
        elif self.grammar is not None and self.grammar.done:
            self.finish(now, "stop")
        elif self.num_tokens - self.num_prompt_tokens >= self.max_tokens:
            self.finish(now, "length")

    def finish(self, now: float, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason, self.stop_reason, self.finished_time = reason, stop_reason, now
        self.status = RequestStatus.FINISHED

    def completion(self, delta: bool) -> CompletionOutput:
        """This step's view of the completion; `delta_text` advances, so call it once per step. delta: only what
        is new since the last call (token_ids, logprobs, and text = delta_text: vLLM's DELTA output kind), which
        keeps each step's output O(new tokens) however long the sequence grows; else all of it so far."""
        with_logprobs = self.params.logprobs is not None
        start = self._num_emitted if delta else 0
        self._num_emitted = self.num_tokens - self.num_prompt_tokens
        delta_text = self.detokenizer.stream_delta(self.finished)
        return CompletionOutput(
            index=self.index,
            text=delta_text if delta else self.detokenizer.text,
            token_ids=self.token_ids[self.num_prompt_tokens + start:],
            cumulative_logprob=self.cumulative_logprob if with_logprobs else None,
            logprobs=self.logprobs[start:] if with_logprobs else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            delta_text=delta_text,
        )
