"""The stop-string automaton against a brute-force search, on random texts fed in random pieces."""
from __future__ import annotations

import random
import time

import pytest

from tokenmill.engine.stop_strings import StopStrings


def _brute(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest end at which some stop string ends, and the longest one ending there."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return end, max(hits, key=len)
    return None


def _pending(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@pytest.mark.parametrize("seed", range(300))
def test_matches_brute_force_fed_in_pieces(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abc"
    stops = list({"".join(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 6))})
    text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
    automaton, state, fed, found = StopStrings(stops), 0, 0, None
    while fed < len(text) and found is None:
        piece = text[fed:fed + rng.randint(1, 4)]
        state, match = automaton.feed(state, piece)
        if match is not None:
            found = (fed + match.end, match.stop)
        else:
            assert automaton.pending(state) == _pending(text[:fed + len(piece)], stops)
        fed += len(piece)
    assert found == _brute(text, stops)


def test_cost_per_token_does_not_grow_with_the_number_of_stop_strings():
    """100,000 stop strings cost about what 10 cost per fed character (one automaton, not a loop, which would be
    ~10^4 times slower); the bound leaves room for the big automaton's cache misses (3.2x measured on Zen 4)."""
    rng = random.Random(0)
    text = "".join(rng.choices("ijklmnop0123", k=20_000))

    def per_char(n: int) -> float:
        automaton = StopStrings(["".join(rng.choices("ijklmnop", k=8)) + str(i) for i in range(n)])
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            state = 0
            for i in range(0, len(text), 4):
                state, _ = automaton.feed(state, text[i:i + 4])
            best = min(best, time.perf_counter() - start)
        return best / len(text)

    assert per_char(100_000) < 10 * per_char(10)
