"""Choose the next token from logits: penalties, temperature, top-k, top-p, min-p, seeded sampling, logprobs.

Processing order follows vLLM: penalties -> temperature -> top-k -> top-p -> min-p -> sample.
Reported logprobs come from the model's raw distribution (before any of the above), as vLLM's default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.sampling_params import SamplingParams


@dataclass
class SampledToken:
    token_id: int
    logprob: float  # of the chosen token under the raw model distribution
    rank: int
    top: list[tuple[int, float]]  # (token id, logprob) of the top-N alternatives, best first


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        if seen.numel():
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                       values * params.repetition_penalty)
    if output_ids and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(output_ids), minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Mask (to -inf) every token that top-k, top-p or min-p excludes; at least one token always survives."""
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


class StepLogits:
    """One step's logits [rows, vocab] with the whole-vocabulary work every row needs (the argmax, the raw
    log-probabilities) done once for all rows, in two batched ops instead of ~3 per row. (log_softmax rather than
    a batched logsumexp, which writes less but measured slower: BENCHMARKS.md.)"""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.raw_logprobs = logits.log_softmax(-1)
        self.argmax = logits.argmax(-1).tolist()

    def sampled(self, row: int, token: int, top_n: int | None) -> SampledToken:
        """token as drawn from `row`, with its raw logprob (and rank and the top-N alternatives if asked)."""
        logprobs = self.raw_logprobs[row]
        if top_n is None:
            return SampledToken(token, float(logprobs[token]), 0, [])
        rank = int((logprobs > logprobs[token]).sum()) + 1
        top = torch.topk(logprobs, top_n) if top_n else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return SampledToken(token, float(logprobs[token]), rank, pairs)


def sample(step: StepLogits, row: int, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
           generator: torch.Generator | None) -> SampledToken:
    """The next token from row `row` of the step's logits."""
    if params.greedy and not has_penalties(params):
        token = step.argmax[row]
    else:
        processed = process_logits(step.logits[row], params, prompt_ids, output_ids)
        token = int(processed.argmax()) if params.greedy else \
            int(torch.multinomial(processed.softmax(-1), 1, generator=generator))
    return step.sampled(row, token, params.logprobs)


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty or params.presence_penalty)


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                   output_ids: list[int]) -> torch.Tensor:
    """The logits a token is drawn from (a new tensor): penalties, then, unless greedy, temperature and
    top-k/top-p/min-p. Shared by plain sampling and speculative verification, so both draw from the same p.

    Always a valid distribution: extreme (finite) penalties or temperatures overflow to +-inf, which becomes the
    largest finite float (so softmax never sees inf - inf), and if nothing is left the raw logits decide."""
    processed = _finite(apply_penalties(logits.clone(), params, prompt_ids, output_ids))
    if not params.greedy:
        processed = filter_logits(_finite(processed / params.temperature), params)
    if bool(torch.isneginf(processed).all()):
        return logits.clone()
    return processed


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """+inf -> the largest finite value, NaN -> -inf (excluded); -inf stays: masked tokens."""
    return logits.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))
