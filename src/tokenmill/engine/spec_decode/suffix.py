"""Suffix decoding (SuffixDecoding, Oliaro et al., NeurIPS 2025): match the end of a request against its own prompt
and output and against recent requests' outputs, and propose the continuation seen most often after the match.
No model; pays off where answers repeat text (code edits, RAG answers, multi-turn chat, agent loops).

What a suffix tree's node counts give is computed at query time: the occurrences of the request's last tokens are
found by C-level byte search of the token array (the most recent MAX_OCCURRENCES, plus those of the longest match),
each occurrence's match length by comparing backwards; for every match length m, the occurrences matching at
least m tokens vote token by token for the most frequent continuation, and the path's probability is the product
of the winners' shares. A request's own index is its token list, so it costs no memory beyond it; the global one
is the outputs of the last `max_cached_requests` finished requests, evicted oldest first.

A draft from match length m is at most `max_spec_factor * m` tokens and `max_tree_depth - m` (the tree depth bounds
match plus speculation, as in vLLM's suffix config; a longer match also counts as a shorter one, whichever allows
the longer draft), and ends where the path's probability falls below `min_token_prob`. Of the drafts from every
match length and both sources, the one with the most expected accepted tokens (sum of the path's probabilities) is
proposed.
"""
from __future__ import annotations

import math
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence

from tokenmill.engine.request import Request
from tokenmill.engine.spec_decode.proposer import Draft

_ITEM = array("i").itemsize
SEPARATOR = -1  # between cached outputs: no token id, so no match or continuation crosses it
MAX_OCCURRENCES = 64  # most recent occurrences of the shortest match that vote (older ones rarely change the vote)


class TokenIndex:
    """A token sequence searchable for occurrences of a suffix pattern (int32 bytes; separators end sequences)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.tokens = token_ids if isinstance(token_ids, array) else array("i", token_ids)
        self.data = self.tokens.tobytes()

    def occurrences(self, pattern: Sequence[int], end: int, limit: int) -> list[int]:
        """Positions just after the most recent `limit` occurrences of `pattern` ending before token `end`."""
        needle = array("i", pattern).tobytes()
        found, stop = [], end * _ITEM
        while len(found) < limit:
            at = self.data.rfind(needle, 0, stop)
            if at < 0:
                break
            if at % _ITEM == 0:
                found.append(at // _ITEM + len(pattern))
            stop = at + len(needle) - 1
        return found

    def match_length(self, after: int, query: Sequence[int], most: int) -> int:
        """How many tokens before position `after` equal the last tokens of `query` (at most `most`)."""
        tokens, n = self.tokens, 0
        while n < most and n < after and tokens[after - 1 - n] == query[len(query) - 1 - n]:
            n += 1
        return n


def best_draft(index: TokenIndex, query: Sequence[int], end: int, k: int, min_match: int, max_depth: int,
               factor: float, min_prob: float) -> tuple[list[int], float]:
    """(draft, expected accepted tokens) continuing `query` from the occurrences in index[:end] of its last tokens."""
    if k <= 0 or len(query) < min_match:
        return [], 0.0
    max_match = min(max_depth - 1, len(query))
    positions = set(index.occurrences(query[-min_match:], end, MAX_OCCURRENCES))
    if len(positions) == MAX_OCCURRENCES:  # many short matches: make sure the long ones are among them
        longest = _longest_match(index, query, end, min_match, max_match)
        positions.update(index.occurrences(query[-longest:], end, MAX_OCCURRENCES))
    matched = sorted(((index.match_length(p, query, max_match), p) for p in positions), reverse=True)
    best, best_score = [], 0.0
    for i, (m, _) in enumerate(matched):
        shorter = matched[i + 1][0] if i + 1 < len(matched) else min_match - 1
        if shorter == m:
            continue  # the occurrences matching at least m tokens vote together: evaluate them once
        length = max(_draft_length(t, k, max_depth, factor) for t in _thresholds(shorter + 1, m, max_depth, factor))
        draft, score = _vote(index, [p for _, p in matched[:i + 1]], length, min_prob)
        if score > best_score:
            best, best_score = draft, score
    return best, best_score


def _draft_length(match: int, k: int, max_depth: int, factor: float) -> int:
    return min(k, max_depth - match, math.ceil(factor * match))


def _thresholds(low: int, high: int, max_depth: int, factor: float) -> set[int]:
    """Match lengths in [low, high] worth trying for the same occurrences (all matching at least `high` tokens,
    none of the others at least `low`): counting a long match as a shorter one leaves more of the tree depth to
    the draft, and factor * match grows with it, so the best is where the two limits cross."""
    cross = max_depth / (1 + factor)
    return {min(high, max(low, t)) for t in (math.floor(cross), math.ceil(cross), low, high)}


def _longest_match(index: TokenIndex, query: Sequence[int], end: int, low: int, high: int) -> int:
    """The longest m in [low, high] whose last-m-token pattern occurs in index[:end] (low is known to occur):
    occurrence is monotone in m, so binary search."""
    while low < high:
        mid = (low + high + 1) // 2
        if index.occurrences(query[-mid:], end, 1):
            low = mid
        else:
            high = mid - 1
    return low


def _vote(index: TokenIndex, positions: list[int], length: int, min_prob: float) -> tuple[list[int], float]:
    """Follow the most frequent next token among the continuations at `positions` while its probability (the
    product of each step's winning share) stays >= min_prob; returns the tokens and the sum of their probabilities."""
    tokens, limit = index.tokens, len(index.tokens)
    draft, prob, score = [], 1.0, 0.0
    alive = positions
    for depth in range(length):
        votes = Counter(tokens[p + depth] for p in alive if p + depth < limit and tokens[p + depth] != SEPARATOR)
        if not votes:
            break
        token, count = votes.most_common(1)[0]
        prob *= count / len(alive)
        if prob < min_prob:
            break
        draft.append(token)
        score += prob
        alive = [p for p in alive if p + depth < limit and tokens[p + depth] == token]
    return draft, score


class OutputCache:
    """The outputs of the last `max_requests` finished requests, kept joined (each followed by SEPARATOR) so that
    adding or evicting one copies in C, not token by token; one TokenIndex over them, rebuilt lazily."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self.outputs: OrderedDict[str, int] = OrderedDict()  # request id -> its length in `joined`, oldest first
        self.joined = array("i")
        self._index: TokenIndex | None = None

    def add(self, request_id: str, output_ids: Sequence[int]) -> None:
        if self.max_requests <= 0 or not output_ids:
            return
        self.joined.extend(output_ids)
        self.joined.append(SEPARATOR)
        self.outputs[request_id] = len(output_ids) + 1
        while len(self.outputs) > self.max_requests:
            del self.joined[:self.outputs.popitem(last=False)[1]]
        self._index = None

    def clear(self) -> None:
        self.outputs.clear()
        del self.joined[:]
        self._index = None

    @property
    def index(self) -> TokenIndex | None:
        if self._index is None and self.outputs:
            self._index = TokenIndex(self.joined)
        return self._index


class SuffixProposer:
    def __init__(self, max_depth: int, max_cached_requests: int, factor: float, min_prob: float,
                 min_match: int = 2) -> None:
        self.max_depth, self.factor, self.min_prob, self.min_match = max_depth, factor, min_prob, min_match
        self.cache = OutputCache(max_cached_requests)

    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Draft]:
        return [Draft(self.draft(r.token_ids, k)) for r, k in zip(requests, num_tokens)]

    def draft(self, token_ids: Sequence[int], k: int) -> list[int]:
        """The better of the drafts from the request's own tokens (matches ending before its last token, so a
        continuation exists) and from recent requests' outputs."""
        own = TokenIndex(token_ids)
        candidates = [best_draft(own, own.tokens, len(own.tokens) - 1, k, self.min_match, self.max_depth,
                                 self.factor, self.min_prob)]
        cached = self.cache.index
        if cached is not None:
            candidates.append(best_draft(cached, own.tokens, len(cached.tokens), k, self.min_match, self.max_depth,
                                         self.factor, self.min_prob))
        return max(candidates, key=lambda c: c[1])[0]

    def learn(self, finished: Sequence[Request]) -> None:
        for request in finished:
            self.cache.add(request.request_id, request.output_ids)

    def retain(self, request_ids: set[str]) -> None:
        """No per-request state: a request's index is its own token list."""
