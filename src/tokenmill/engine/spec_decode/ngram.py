"""Prompt lookup: find the last n tokens earlier in prompt + output (n from max down to min) and propose what
followed them. No model; pays off when the output copies from the input (rewrites, extraction, code edits)."""
from __future__ import annotations

from array import array
from collections.abc import Sequence

from tokenmill.engine.request import Request
from tokenmill.engine.spec_decode.proposer import Draft

_ITEM = array("i").itemsize


def ngram_lookup(token_ids: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """k tokens that followed the most recent earlier occurrence of the longest matching suffix n-gram ([] if none).

    bytes.rfind does the search in C; a hit at an offset that is not a whole token is skipped."""
    if k <= 0 or len(token_ids) <= min_n:
        return []
    data = array("i", token_ids).tobytes()
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = data[(length - n) * _ITEM:]
        end = (length - 1) * _ITEM  # the match must end before the last token, so a continuation exists
        while True:
            at = data.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % _ITEM == 0:
                return _continuation(token_ids, at // _ITEM + n, k)
            end = at + len(pattern) - 1
    return []


def _continuation(token_ids: Sequence[int], start: int, k: int) -> list[int]:
    """token_ids[start:start + k]; past the end, the match implies the text repeats with period len - start
    (a recent match overlapping the suffix, as in loops, would otherwise give only a token or two)."""
    period = len(token_ids) - start
    out = list(token_ids[start:start + k])
    while len(out) < k:
        out.append(out[len(out) - period])
    return out


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Draft]:
        return [Draft(ngram_lookup(r.token_ids, self.min_n, self.max_n, k)) for r, k in zip(requests, num_tokens)]

    def learn(self, finished: Sequence[Request]) -> None:
        """Looks only at the request's own tokens."""

    def retain(self, request_ids: set[str]) -> None:
        """Stateless."""
