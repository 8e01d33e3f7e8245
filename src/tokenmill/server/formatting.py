"""Pieces both response shapes share: usage counts and the per-token logprob view.

Completions and chat print logprobs differently (parallel lists vs. one object per token) but pick the same
facts from the engine's entries: the chosen token's text and logprob, and the top-N alternatives by rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.outputs import RequestOutput, TokenLogprobs
from tokenmill.server.responses import PromptTokensDetails, Usage

_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI and vLLM clamp to this


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # best first, at most N


def token_logprobs(token_ids: list[int], entries: list[TokenLogprobs], num_top: int) -> list[TokenLogprob]:
    result = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        top = sorted((lp for lp in entry.values() if lp.rank <= num_top), key=lambda lp: lp.rank)
        result.append(TokenLogprob(chosen.decoded_token, max(chosen.logprob, _MIN_LOGPROB),
                                   [(lp.decoded_token, max(lp.logprob, _MIN_LOGPROB)) for lp in top]))
    return result


def usage(outputs: list[RequestOutput | None]) -> Usage:
    """Each prompt counts once, however many choices (n) it has; completion tokens count every choice."""
    outs = [o for o in outputs if o is not None]
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(o.num_cached_tokens for o in outs)))
