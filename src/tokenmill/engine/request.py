"""Request state as the engine tracks it: prompt, per-sequence outputs, stop decisions, timestamps."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tokenmill.cache.contiguous import ContiguousKVCache
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.model.sampler import SampledToken
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from tokenmill.sampling_params import SamplingParams


@dataclass
class Sequence:
    """One of a request's `n` completions."""

    index: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    cache: ContiguousKVCache
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped by the context length
    stop_token_ids: set[int]
    sequences: list[Sequence]
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    def record(self, seq: Sequence, sampled: SampledToken, decode_token) -> None:
        """Append a sampled token to `seq` and decide whether it ends the sequence."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        seq.output_ids.append(sampled.token_id)
        seq.cumulative_logprob += sampled.logprob
        if self.params.logprobs is not None:
            entry = {tid: Logprob(lp, rank + 1, decode_token(tid)) for rank, (tid, lp) in enumerate(sampled.top)}
            entry[sampled.token_id] = Logprob(sampled.logprob, sampled.rank, decode_token(sampled.token_id))
            seq.logprobs.append(entry)
        if sampled.token_id in self.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", sampled.token_id
        else:
            seq.detokenizer.add(sampled.token_id)
            if seq.detokenizer.stopped_by is not None:
                seq.finish_reason, seq.stop_reason = "stop", seq.detokenizer.stopped_by
            elif len(seq.output_ids) >= self.max_tokens:
                seq.finish_reason = "length"
        if self.finished:
            self.finished_time = now

    def abort(self) -> None:
        for seq in self.sequences:
            if not seq.finished:
                seq.finish_reason = "abort"
        self.finished_time = time.monotonic()

    def make_output(self) -> RequestOutput:
        """This step's snapshot; `delta_text` advances, so call it once per step."""
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.detokenizer.text,
                token_ids=list(s.output_ids),
                cumulative_logprob=s.cumulative_logprob if self.params.logprobs is not None else None,
                logprobs=list(s.logprobs) if self.params.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                delta_text=s.detokenizer.stream_delta(s.finished),
            )
            for s in self.sequences
        ]
        metrics = {"arrival_time": self.arrival_time}
        if self.first_token_time is not None:
            metrics["first_token_time"] = self.first_token_time
        if self.finished_time is not None:
            metrics["finished_time"] = self.finished_time
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), outputs, self.finished, metrics)
