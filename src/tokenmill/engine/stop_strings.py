"""Stop strings matched by one Aho-Corasick automaton, fed only the text each token adds.

A loop over the stop strings per token costs O(strings) for every token of the request, inside the engine core,
where it slows every other request in the batch. The automaton costs O(new characters) per token however many
stop strings there are, and its state says how much of the text's tail could still become a stop string, which
is exactly what streaming must hold back.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    end: int  # index just past the match in the text fed in this call
    stop: str


class StopStrings:
    """The automaton over a request's stop strings; immutable, so a request's n sequences share one. Each
    sequence keeps its own state (an int, 0 at the start)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self._next: list[dict[str, int]] = [{}]
        self._depth = [0]  # characters matched on the path to each state
        self._match: list[int] = [-1]  # the stop ending at each state (longest first), via fail links: -1 none
        for index, stop in enumerate(self.stops):
            state = 0
            for ch in stop:
                if ch not in self._next[state]:
                    self._next[state][ch] = len(self._next)
                    self._next.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._match.append(-1)
                state = self._next[state][ch]
            if self._match[state] == -1:
                self._match[state] = index
        self._fail = [0] * len(self._next)
        queue = deque(self._next[0].values())
        while queue:
            state = queue.popleft()
            for ch, child in self._next[state].items():
                fallback = self._fail[state]
                while fallback and ch not in self._next[fallback]:
                    fallback = self._fail[fallback]
                self._fail[child] = self._next[fallback].get(ch, 0) if self._next[fallback].get(ch) != child else 0
                if self._match[child] == -1:
                    self._match[child] = self._match[self._fail[child]]
                queue.append(child)

    def __len__(self) -> int:
        return len(self.stops)

    def feed(self, state: int, text: str) -> tuple[int, StopMatch | None]:
        """Advance `state` over `text`; stops at the first stop string that ends in it (the earliest end)."""
        for i, ch in enumerate(text):
            while state and ch not in self._next[state]:
                state = self._fail[state]
            state = self._next[state].get(ch, 0)
            if self._match[state] != -1:
                return state, StopMatch(i + 1, self.stops[self._match[state]])
        return state, None

    def pending(self, state: int) -> int:
        """Characters at the end of the text fed so far that are the start of some stop string."""
        return self._depth[state]
