"""Suffix decoding: the proposer's choices on hand-made sequences (frequency, match length, probability cut, tree
depth, the cache of finished outputs), its config, and in the engine: greedy output unchanged, finished outputs
proposed to later requests."""
from __future__ import annotations

import pytest

from spec_cases import all_free, random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine.spec_decode.suffix import SuffixProposer


def _proposer(depth: int = 24, cached: int = 10, factor: float = 1.0, min_prob: float = 0.1) -> SuffixProposer:
    return SuffixProposer(depth, cached, factor, min_prob)


class Finished:
    def __init__(self, request_id: str, output_ids: list[int]) -> None:
        self.request_id, self.output_ids = request_id, output_ids


def test_most_frequent_continuation_wins_over_the_most_recent():
    # after [1, 2]: 3 twice, 4 once (the most recent, which prompt lookup would take)
    tokens = [1, 2, 3, 1, 2, 3, 1, 2, 4, 9, 1, 2]
    assert _proposer().draft(tokens, 8) == [3, 1]  # a 2-token match drafts at most 2 tokens (factor 1.0)
    assert _proposer(factor=3.0).draft(tokens, 8)[:3] == [3, 1, 2]  # longer while the path's probability >= 0.1


def test_draft_length_follows_the_match_length():
    body = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    short = [5, 6, 7, 8] + body + [99, 7, 8]  # only [7, 8] matches again
    long = [5, 6, 7, 8] + body + [99, 5, 6, 7, 8]  # [5, 6, 7, 8] matches
    assert _proposer().draft(short, 16) == body[:2]
    assert _proposer().draft(long, 16) == body[:4]
    assert _proposer(factor=2.5).draft(long, 16) == body[:10]
    assert _proposer(factor=2.5).draft(long, 3) == body[:3]  # k caps it


def test_probability_cut_and_tree_depth():
    # after [1, 2] five different continuations: each has probability 1/5
    tokens = [1, 2, 3, 10, 1, 2, 4, 11, 1, 2, 5, 12, 1, 2, 6, 13, 1, 2, 7, 14, 1, 2]
    assert len(_proposer(min_prob=0.1).draft(tokens, 4)) == 2
    assert _proposer(min_prob=0.3).draft(tokens, 4) == []
    long = [5, 6, 7, 8, 9, 10, 11, 12, 13, 99, 5, 6, 7, 8]
    # the 4-token match counts as a 2-token one: 2 + 4 drafted = depth 6
    assert _proposer(depth=6, factor=4.0).draft(long, 16) == [9, 10, 11, 12]


def test_a_long_copy_drafts_half_the_tree_depth():
    """Copying a long passage: the match reaches the depth limit, and is counted as a 12-token one (12 + 12 = 24)."""
    passage = list(range(100, 160))
    tokens = [1] + passage + [2] + passage[:40]
    assert _proposer().draft(tokens, 16) == passage[40:52]
    assert _proposer(depth=40).draft(tokens, 16) == passage[40:56]


def test_no_match_no_draft():
    assert _proposer().draft([1, 2, 3, 4], 4) == []
    assert _proposer().draft([256, 1, 0, 0, 0, 256, 1], 2) == [0, 0]  # whole tokens only, not byte-level matches


def test_finished_outputs_are_proposed_to_later_requests():
    proposer = _proposer(cached=2)
    proposer.learn([Finished("a", [40, 41, 42, 43, 44, 45, 46, 47])])
    assert proposer.draft([7, 7, 40, 41, 42, 43], 8) == [44, 45, 46, 47]
    proposer.learn([Finished("b", [50, 51, 52]), Finished("c", [60, 61, 62])])  # "a" is evicted (2 kept)
    assert proposer.draft([7, 7, 40, 41, 42, 43], 8) == []
    assert proposer.draft([1, 50, 51], 8) == [52]  # no continuation across the end of a cached output
    off = _proposer(cached=0)
    off.learn([Finished("a", [40, 41, 42, 43, 44, 45, 46, 47])])
    assert off.draft([7, 7, 40, 41, 42, 43], 8) == [] and not off.cache.outputs


@pytest.mark.parametrize("value,field", [
    ({"method": "suffix", "num_speculative_tokens": 8, "prompt_lookup_max": 3}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 8, "suffix_decoding_max_tree_depth": 3}, "max_tree_depth"),
    ({"method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_max_tree_depth": 1}, "max_tree_depth"),
    ({"method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_min_token_prob": 1.5}, "min_token_prob"),
    ({"method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_max_spec_factor": "2"}, "spec_factor"),
    ({"method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_max_cached_requests": -1}, "cached"),
    ({"method": "suffix", "num_speculative_tokens": 8, "num_layers": 2}, "num_layers"),
])
def test_bad_suffix_config_names_the_field(value, field):
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig.parse(value)


def test_greedy_output_unchanged_and_outputs_reused(tiny_dir, plain):
    """Each prompt twice, one after the other: greedy tokens equal the plain engine's, and the second run of a
    prompt is drafted from the first one's output (the random model's answers do not repeat its prompt)."""
    prompts = random_prompts(6, seed=7)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts], params)]
    own_only = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24, speculative_config={
        "method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_max_cached_requests": 0, "mode": "always"})
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24, speculative_config={
        "method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_max_spec_factor": 4.0, "mode": "always"})
    second_run = []
    for engine in (own_only, llm):
        for _ in range(2):
            before = engine.engine.stats().spec_num_accepted_tokens
            got = [engine.generate([{"prompt_token_ids": p}], params)[0].outputs[0].token_ids for p in prompts]
            assert got == expected
        second_run.append(engine.engine.stats().spec_num_accepted_tokens - before)
        all_free(engine.engine)
    # 24 tokens each: the first two have no match yet, then the earlier answer is drafted whole
    assert second_run[0] < len(prompts) * 4 and second_run[1] >= len(prompts) * 16
