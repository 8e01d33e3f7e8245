"""A user request: `n` sampled completions of one prompt, each run as its own engine Request (under best_of, more
run and the n most likely are returned).

The children share the prompt's KV blocks through the prefix cache, so fanning out costs little.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tokenmill.engine.request import Request
from tokenmill.outputs import RequestOutput, TokenLogprobs


@dataclass
class ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    n: int = 1  # completions returned: fewer than the children under best_of
    error: str | None = None  # why the engine ended it early (a failed row), reported instead of output
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # until the first output carries them

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)

    def _completions(self, delta: bool) -> list:
        """Every child's completion; under best_of, nothing until all finish, then the n most likely, as 0..n-1."""
        if len(self.children) == self.n:
            return [c.completion(delta) for c in self.children]
        if not self.finished:
            return []
        best = sorted(self.children, key=lambda c: -c.cumulative_logprob)[:self.n]
        return [dataclasses.replace(c.completion(delta), index=i) for i, c in enumerate(best)]

    def make_output(self, delta: bool = False) -> RequestOutput:
        """delta: each completion holds only what is new since the last output (see Request.completion)."""
        first = self.children[0]
        metrics = {"arrival_time": first.arrival_time}
        for name in ("first_scheduled_time", "first_token_time", "finished_time"):
            times = [getattr(c, name) for c in self.children if getattr(c, name) is not None]
            if times:
                metrics[name] = max(times) if name == "finished_time" else min(times)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=self._completions(delta),
            finished=self.finished,
            num_cached_tokens=first.num_cached_prompt_tokens,
            metrics=metrics,
            error=self.error,
            prompt_logprobs=self._take_prompt_logprobs(delta),
        )

    def _take_prompt_logprobs(self, delta: bool) -> list[TokenLogprobs | None] | None:
        """Every output carries them, or only the first of a delta stream."""
        logprobs = self.prompt_logprobs
        if delta:
            self.prompt_logprobs = None
        return logprobs
