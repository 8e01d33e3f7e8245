"""Choose the next token from logits: bans, logit bias, penalties, temperature, top-k, top-p, min-p, seeded
sampling, logprobs.

Processing order follows vLLM: bans (allowed_token_ids, a grammar's mask, min_tokens' stop tokens, bad words) ->
logit_bias -> penalties -> temperature -> top-k -> top-p -> min-p -> sample.
Reported logprobs come from the model's raw distribution (before any of the above), as vLLM's default.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.sampling_params import SamplingParams


@dataclass
class SampledToken:
    token_id: int
    logprob: float  # of the chosen token under the raw model distribution
    rank: int
    top: list[tuple[int, float]]  # (token id, logprob) of the top-N alternatives, best first


@dataclass(frozen=True)
class TokenRules:
    """A request's bans that depend on where it is: min_tokens' stop ids until enough tokens are out, and each bad
    word's last token after its other tokens (vLLM's rule). Built once per request by the engine, which knows the
    stop ids and tokenizes the words; asked per position, so verification can ask it per draft token."""

    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()

    def banned(self, output_ids: Sequence[int]) -> list[int]:
        banned = list(self.stop_ids) if len(output_ids) < self.min_tokens else []
        for word in self.bad_words:
            prefix = word[:-1]
            if len(output_ids) >= len(prefix) and tuple(output_ids[len(output_ids) - len(prefix):]) == prefix:
                banned.append(word[-1])
        return banned

    def __bool__(self) -> bool:
        return bool(self.min_tokens and self.stop_ids) or bool(self.bad_words)


NO_RULES = TokenRules()


def apply_bans(logits: torch.Tensor, params: SamplingParams, output_ids: Sequence[int], rules: TokenRules,
               allowed: torch.Tensor | None) -> torch.Tensor:
    """-inf for every token the request may not generate here; `allowed`: a grammar's mask (True: may follow)."""
    if params.allowed_token_ids is not None:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[torch.tensor(params.allowed_token_ids)] = True
        logits.masked_fill_(~keep, float("-inf"))
    if allowed is not None:
        logits[:allowed.numel()].masked_fill_(~allowed, float("-inf"))
        logits[allowed.numel():] = float("-inf")  # the model's padding rows past the tokenizer's vocabulary
    if banned := rules.banned(output_ids):
        logits[torch.tensor(banned)] = float("-inf")
    return logits


def apply_logit_bias(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.logit_bias:
        tokens = torch.tensor(list(params.logit_bias))
        logits[tokens] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    return logits


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
        argmax = logits.argmax(-1)
        self.argmax = argmax.tolist()
        self._argmax_logprobs = self.raw_logprobs.gather(-1, argmax[:, None]).view(-1).tolist()

    def row(self, row: int) -> torch.Tensor:
        """One row's logits on the CPU, where logits processors and requests' generators work (on the GPU path a
        copy of that row only)."""
        return self.logits[row].cpu()

    def sampled(self, row: int, token: int, top_n: int | None) -> SampledToken:
        """token as drawn from `row`, with its raw logprob (and rank and the top-N alternatives if asked)."""
        if top_n is None and token == self.argmax[row]:
            return SampledToken(token, self._argmax_logprobs[row], 0, [])
        logprobs = self.raw_logprobs[row]
        if top_n is None:
            return SampledToken(token, float(logprobs[token]), 0, [])
        rank = int((logprobs > logprobs[token]).sum()) + 1
        top = torch.topk(logprobs, top_n) if top_n else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return SampledToken(token, float(logprobs[token]), rank, pairs)


def sample(step: StepLogits, row: int, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
           generator: torch.Generator | None, rules: TokenRules = NO_RULES,
           allowed: torch.Tensor | None = None) -> SampledToken:
    """The next token from row `row` of the step's logits; `allowed`: the grammar's mask, if the request has one."""
    if params.greedy and allowed is None and not changes_logits(params, rules):
        token = step.argmax[row]
    else:
        processed = process_logits(step.row(row), params, prompt_ids, output_ids, rules, allowed)
        token = int(processed.argmax()) if params.greedy else \
            int(torch.multinomial(processed.softmax(-1), 1, generator=generator))
    return step.sampled(row, token, params.logprobs)


def changes_logits(params: SamplingParams, rules: TokenRules = NO_RULES) -> bool:
    """Whether anything but temperature stands between the raw logits and the token (greedy may skip them)."""
    return (params.repetition_penalty != 1.0 or bool(params.frequency_penalty or params.presence_penalty)
            or bool(params.logit_bias) or params.allowed_token_ids is not None or bool(rules))


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                   rules: TokenRules = NO_RULES, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The logits a token is drawn from (a new tensor): bans, logit bias and penalties, then, unless greedy,
    temperature and top-k/top-p/min-p. Shared by plain sampling and speculative verification, so both draw from
    the same p.

    Always a valid distribution: extreme (finite) penalties or temperatures overflow to +-inf, which becomes the
    largest finite float (so softmax never sees inf - inf). If the filters leave nothing the banned-only logits
    decide, and if the bans themselves leave nothing (a contradiction), the raw logits."""
    banned = apply_bans(logits.clone(), params, output_ids, rules, allowed)
    processed = _finite(apply_penalties(apply_logit_bias(banned.clone(), params), params, prompt_ids, output_ids))
    if not params.greedy:
        processed = filter_logits(_finite(processed / params.temperature), params)
    for candidate in (processed, banned):
        if not bool(torch.isneginf(candidate).all()):
            return candidate
    return logits.clone()


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """+inf -> the largest finite value, NaN -> -inf (excluded); -inf stays: masked tokens."""
    return logits.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))
