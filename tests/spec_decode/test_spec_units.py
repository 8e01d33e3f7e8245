"""Speculative decoding's parts on their own: config validation, n-gram lookup, the rejection sampler (its
output distribution by chi-square at ALPHA), greedy verification, the adaptive controller and the choice between
proposers of a "mix" config."""
from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from spec_cases import ALPHA, chi_square_pvalue
from tokenmill.engine.spec_decode.adaptive import WARMUP_STEPS, AdaptiveController
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine.spec_decode.ngram import ngram_lookup
from tokenmill.engine.spec_decode.proposer import Draft
from tokenmill.engine.spec_decode.rejection import greedy_verify, rejection_sample
from tokenmill.engine.spec_decode.speculator import Speculator


@pytest.mark.parametrize("value,field", [
    ({"num_speculative_tokens": 4}, "method"),
    ({"method": "eagle", "num_speculative_tokens": 4}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": "4"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 0}, "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 4, "model": "x.gguf"}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 4, "mode": "sometimes"}, "mode"),
    ({"method": "ngram", "num_speculative_tokens": 4, "draft_tokens": 3}, "draft_tokens"),
    ({"method": "draft_model", "num_speculative_tokens": 4, "quantization": "int3"}, "quantization"),
    ({"method": "draft_model", "num_speculative_tokens": 4, "num_layers": 0}, "num_layers"),
    ({"method": "mix", "num_speculative_tokens": 4, "model": "x.gguf"}, "model"),
    ({"method": "mixed", "num_speculative_tokens": 4}, "method"),
    ("{not json", "JSON"),
    ([1, 2], "dict"),
])
def test_bad_config_names_the_field(value, field):
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig.parse(value)


def test_config_from_json_and_off_by_default():
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 7}')
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_max, config.mode) == (
        "ngram", 4, 7, "auto")
    assert config.proposer_methods == ("ngram",)
    assert SpeculativeConfig.parse(None) is None
    mix = SpeculativeConfig.parse({"method": "mix", "num_speculative_tokens": 8, "prompt_lookup_max": 6,
                                   "suffix_decoding_max_tree_depth": 32})  # both proposers' fields apply
    assert mix.proposer_methods == ("suffix", "ngram")
    assert (mix.prompt_lookup_max, mix.suffix_decoding_max_tree_depth) == (6, 32)


class _Fixed:
    """A proposer that always drafts `tokens` (cut to the length asked), or nothing."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.calls = tokens, 0

    def propose(self, requests, num_tokens):
        self.calls += 1
        return [Draft(self.tokens[:k]) for k in num_tokens]

    def learn(self, finished):
        pass

    def retain(self, request_ids):
        pass


def _decoding(request_id: str) -> SimpleNamespace:
    """What Speculator.propose reads of a request that is about to decode."""
    return SimpleNamespace(request_id=request_id, num_tokens=10, num_computed_tokens=9, max_tokens=100,
                           num_prompt_tokens=5, grammar=None, draft_token_ids=[])


def test_mix_drafts_each_request_with_the_proposer_it_accepts_best():
    config = SpeculativeConfig("mix", 3, mode="always")
    suffix, ngram = _Fixed([1, 2, 3]), _Fixed([7, 8, 9])
    speculator = Speculator(config, {"suffix": suffix, "ngram": ngram})
    a, b = _decoding("a"), _decoding("b")
    speculator.propose([a, b])
    assert a.draft_token_ids == b.draft_token_ids == [1, 2, 3]  # no evidence yet: the first proposer
    for _ in range(3):  # a rejects suffix's drafts; ngram's prior for it is still the untried 1/2
        speculator.controller.observe_acceptance("a", 3, 0, "suffix")
        speculator.controller.observe_acceptance("b", 3, 3, "suffix")
    speculator.propose([a, b])
    assert a.draft_token_ids == [7, 8, 9] and b.draft_token_ids == [1, 2, 3]
    assert {r: m for r, (m, _) in speculator.drafts.items()} == {"a": "ngram", "b": "suffix"}


@pytest.mark.parametrize("methods", [("suffix",), ("suffix", "ngram")])
def test_draft_length_follows_the_acceptance_of_the_proposer_that_drafts(methods):
    """The plan sizes a request's draft from the acceptance of the proposer that will draft it (with one proposer,
    the request's own): well-accepted drafts grow to the cap where the same cost model gives untried ones less."""
    speculator = Speculator(SpeculativeConfig("mix" if len(methods) > 1 else methods[0], 8),
                            {m: _Fixed(list(range(8))) for m in methods})
    speculator.controller = _trained(a=0.02, b=0.01, c=0.0)
    speculator.controller.max_tokens = 8
    fresh, good = _decoding("fresh"), _decoding("good")
    for _ in range(5):
        speculator.controller.observe_acceptance("good", 8, 8, speculator._key(methods[0]))
    speculator.propose([fresh, good])
    assert len(good.draft_token_ids) == 8 > len(fresh.draft_token_ids)


def test_mix_falls_back_to_the_next_proposer_when_the_first_has_nothing():
    empty, ngram = _Fixed([]), _Fixed([7, 8])
    speculator = Speculator(SpeculativeConfig("mix", 2, mode="always"), {"suffix": empty, "ngram": ngram})
    request = _decoding("r")
    speculator.propose([request])
    assert request.draft_token_ids == [7, 8] and speculator.drafts["r"][0] == "ngram"
    assert (empty.calls, ngram.calls) == (1, 1)




@pytest.mark.parametrize("tokens,k,expected", [
    ([1, 2, 3, 4, 1, 2, 3], 4, [4, 1, 2, 3]),  # longest suffix (3 tokens) wins
    ([1, 2, 3, 4, 2, 3], 3, [4, 2, 3]),  # only the 2-gram matches
    ([7, 8, 9, 8, 9, 5, 8, 9], 2, [5, 8]),  # the most recent occurrence
    ([5, 5, 5, 5], 4, [5, 5, 5, 5]),  # a loop continues periodically past the end
    ([1, 2, 3, 4], 3, []),  # no earlier occurrence of even the shortest n-gram
    ([1, 2, 9, 2], 3, []),  # [9, 2] does not occur earlier and 1-grams are below prompt_lookup_min
    ([256, 1, 0, 0, 0, 256, 1], 2, [0, 0]),  # byte-level matches across token boundaries are skipped
])
def test_ngram_lookup(tokens, k, expected):
    assert ngram_lookup(tokens, 2, 3, k) == expected


def test_ngram_lookup_falls_back_to_shorter_ngrams():
    assert ngram_lookup([4, 9, 1, 2, 9], 1, 3, 2) == [1, 2]
    assert ngram_lookup([4, 9, 1, 2, 9], 2, 3, 2) == []




def _random_dist(generator: torch.Generator, size: int, zeros: int = 0) -> torch.Tensor:
    p = torch.rand(size, generator=generator) ** 2
    p[torch.randperm(size, generator=generator)[:zeros]] = 0.0
    return p / p.sum()


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft-q", "one-hot-q"])
def test_rejection_sampler_emits_the_target_distribution(deterministic):
    """Two draft tokens drawn from q (or a fixed token for one-hot q): the first emitted token is distributed as
    p_0, and, given the first draft was accepted, the second emitted as p_1 (row 1 is conditioned on it)."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 6, 20000
    p = torch.stack([_random_dist(g, vocab, zeros=1) for _ in range(3)])
    q = torch.stack([_random_dist(g, vocab) for _ in range(2)])
    first, second = Counter(), Counter()
    for _ in range(n):
        if deterministic:
            draft, probs = [2, 4], None
        else:
            draft, probs = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)], q
        out = rejection_sample(p, draft, probs, g)
        assert 1 <= len(out) <= 3 and out[:-1] == draft[:len(out) - 1]
        first[out[0]] += 1
        if len(out) > 1:  # the first draft was accepted: the next token must follow p_1 whatever came next
            second[out[1]] += 1
    assert chi_square_pvalue(first, dict(enumerate(p[0].tolist())), n) > ALPHA
    assert chi_square_pvalue(second, dict(enumerate(p[1].tolist())), sum(second.values())) > ALPHA
    # and the test has power: the draft distribution itself is rejected
    if not deterministic:
        assert chi_square_pvalue(first, dict(enumerate(q[0].tolist())), n) < ALPHA


def test_rejection_sampler_accepts_everything_when_q_equals_p_and_adds_a_bonus():
    g = torch.Generator().manual_seed(1)
    p = torch.stack([_random_dist(g, 5) for _ in range(3)])
    p[2] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    assert rejection_sample(p, [1, 4], p[:2].clone(), g) == [1, 4, 3]


def test_rejection_sampler_never_emits_a_token_p_excludes():
    g = torch.Generator().manual_seed(2)
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]])
    for _ in range(200):
        out = rejection_sample(p, [2], None, g)  # a one-hot draft on a token p gives 0
        assert len(out) == 1 and out[0] in (0, 1)


def test_greedy_verify_keeps_the_agreeing_prefix_then_the_target_token():
    assert greedy_verify([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted, plus the bonus token
    assert greedy_verify([5, 9, 7, 8], [5, 6, 7]) == [5, 9]
    assert greedy_verify([1, 2], [3]) == [1]




def _trained(a: float, b: float, c: float, steps: int = 40) -> AdaptiveController:
    """A controller that saw steps costing a + b * tokens + c * verify_chunks seconds, of varied sizes."""
    controller = AdaptiveController(max_tokens=5, mode="auto")
    rng = random.Random(0)
    for _ in range(steps):
        tokens, chunks = rng.randint(1, 300), rng.randint(0, 8)
        controller.observe_step(tokens, chunks, a + b * tokens + c * chunks)
    return controller


def test_single_stream_with_cheap_tokens_speculates_fully():
    """CPU decode at batch 1 is bound by reading the weights: 4 more tokens cost ~nothing."""
    controller = _trained(a=0.02, b=0.00005, c=0.0002)
    assert controller.plan(["r"], [100]) == [5]


def test_large_batch_with_expensive_tokens_turns_speculation_off():
    """When a token costs as much as the whole fixed overhead, 64 requests do not gain from drafts."""
    controller = _trained(a=0.005, b=0.002, c=0.001)
    ids = [f"r{i}" for i in range(64)]
    for request_id in ids:
        controller.observe_acceptance(request_id, 4, 1)
    assert controller.plan(ids, [100] * 64) == [0] * 64


def test_proposed_length_follows_each_requests_acceptance():
    controller = _trained(a=0.02, b=0.001, c=0.0)
    for _ in range(5):
        controller.observe_acceptance("good", 4, 4)
        controller.observe_acceptance("bad", 4, 0)
    good, bad = controller.plan(["good", "bad"], [100, 100])
    assert good > bad and good >= 3
    assert controller.plan(["good"], [2]) == [2]  # never more than the request's limit


def test_a_new_request_starts_from_recent_requests_acceptance():
    copying, chatting = _trained(a=0.02, b=0.004, c=0.0), _trained(a=0.02, b=0.004, c=0.0)
    for i in range(20):
        copying.observe_acceptance(f"old{i}", 5, 5)
        chatting.observe_acceptance(f"old{i}", 5, 0)
    assert copying.alpha("new") > 0.9 > 0.1 > chatting.alpha("new")
    assert copying.plan(["new"], [100]) == [5] and chatting.plan(["new"], [100]) == [0]


def test_forced_modes_ignore_costs():
    always = AdaptiveController(max_tokens=4, mode="always")
    never = AdaptiveController(max_tokens=4, mode="never")
    for controller in (always, never):
        for _ in range(WARMUP_STEPS + 5):
            controller.observe_step(100, 10, 10.0)
    assert always.plan(["a", "b"], [9, 2]) == [4, 2]
    assert never.plan(["a", "b"], [9, 2]) == [0, 0]
