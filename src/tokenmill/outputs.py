"""What generation returns, shaped like vLLM's RequestOutput so existing user code reads it unchanged."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str


# One entry per generated token: token id -> Logprob, holding the chosen token and the top-N alternatives.
TokenLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    delta_text: str = ""  # text new since this request's previous output, for streaming

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # set when the engine ended the request on an internal failure (finish "abort")
    # SamplingParams.prompt_logprobs: per prompt token (None for the first, which nothing predicts); in the first
    # output only when outputs are deltas
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class EmbeddingOutput:
    embedding: list[float]  # L2-normalized, hidden_size long


@dataclass
class EmbeddingRequestOutput:
    """One prompt's embedding, as vLLM's `LLM.embed` returns it (`.outputs.embedding`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
