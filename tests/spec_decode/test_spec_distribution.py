"""Sampling under speculation follows the target's distribution: chi-square at ALPHA over many seeded requests,
for each proposer, and a control showing the test catches a verifier that accepts every draft."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from spec_cases import ALPHA, NGRAM, all_free, chi_square_pvalue, random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.engine.spec_decode import speculator as speculator_module
from tokenmill.model.sampler import process_logits

SAMPLED = {"temperature": 0.5, "top_k": 3, "max_tokens": 4, "ignore_eos": True}
NUM_SAMPLES = 1500


@pytest.fixture(scope="module")
def loop_prompt(plain) -> list[int]:
    """A prompt ending inside a greedy loop of the tiny model (a token repeating), the one whose next token is
    most certain, so n-gram drafts are often, but not always, accepted under sampling."""
    candidates = []
    for prompt in random_prompts(32, seed=11):
        out = plain.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=40,
                                                                          ignore_eos=True))[0].outputs[0].token_ids
        for i in range(len(out) - 3):
            if out[i] == out[i + 1] == out[i + 2] == out[i + 3]:
                candidates.append(prompt + out[:i + 3])
                break
    assert candidates, "no greedy loop found"
    return max(candidates, key=lambda p: float(plain.score(p)[-1].softmax(-1).max()))


def _exact_joint(llm: LLM, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    """P(first `length` output tokens) under SAMPLED, from the target's own logits, context by context."""
    params = SamplingParams(**SAMPLED)
    joint = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, prob in joint.items():
            logits = llm.score(prompt + list(prefix))[-1]
            probs = process_logits(logits, params, prompt, list(prefix)).softmax(-1)
            for token in torch.nonzero(probs).flatten().tolist():
                nxt[prefix + (token,)] = prob * float(probs[token])
        joint = nxt
    return joint


def _sampled_joint(llm: LLM, prompt: list[int], length: int) -> Counter:
    outs = llm.generate([{"prompt_token_ids": prompt}] * NUM_SAMPLES,
                        [SamplingParams(**SAMPLED, seed=s) for s in range(NUM_SAMPLES)])
    return Counter(tuple(o.outputs[0].token_ids[:length]) for o in outs)


@pytest.fixture(scope="module")
def expected_joint(plain, loop_prompt):
    return _exact_joint(plain, loop_prompt, 3)


@pytest.mark.parametrize("spec", [
    {**NGRAM, "mode": "always"},
    {"method": "draft_model", "num_speculative_tokens": 3, "num_layers": 1, "mode": "always"},
], ids=["ngram", "draft-1-layer"])
def test_sampled_tokens_follow_the_target_distribution(tiny_dir, loop_prompt, expected_joint, spec):
    """The first three sampled tokens (the 2nd and 3rd come from verification) jointly follow the target:
    chi-square over 1500 seeded requests, at significance ALPHA; acceptance is neither 0 nor 1."""
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24, speculative_config=spec)
    observed = _sampled_joint(llm, loop_prompt, 3)
    stats = llm.engine.stats()
    assert 0.1 * stats.spec_num_draft_tokens < stats.spec_num_accepted_tokens < 0.9 * stats.spec_num_draft_tokens
    assert chi_square_pvalue(observed, expected_joint, NUM_SAMPLES) > ALPHA
    all_free(llm.engine)


def test_distribution_test_catches_a_biased_verifier(tiny_dir, loop_prompt, expected_joint, monkeypatch):
    """Accepting every draft token (no min(1, p/q) test) skews the distribution, and the test sees it."""
    monkeypatch.setattr(speculator_module, "rejection_sample",
                        lambda p, drafts, q, g: list(drafts) + [int(torch.multinomial(p[len(drafts)], 1, generator=g))])
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24, speculative_config={**NGRAM, "mode": "always"})
    observed = _sampled_joint(llm, loop_prompt, 3)
    assert chi_square_pvalue(observed, expected_joint, NUM_SAMPLES) < ALPHA
