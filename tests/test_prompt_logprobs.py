"""prompt_logprobs: each prompt token's logprob under the tokens before it (the first has none), equal to the
model's own scoring of the prompt, with its rank and the top alternatives; in the first output only when outputs
are deltas."""
from __future__ import annotations

import pytest
import torch

from tokenmill import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog"


def test_prompt_logprobs_equal_the_models_scoring(llm_f32):
    ids = llm_f32.tokenizer.encode(PROMPT)
    out = llm_f32.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=2,
                                                                     prompt_logprobs=3))[0]
    entries = out.prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    expected = torch.log_softmax(llm_f32.score(ids), -1)
    for i, (token, entry) in enumerate(zip(ids[1:], entries[1:])):
        assert entry[token].logprob == pytest.approx(float(expected[i, token]), abs=1e-4)
        assert entry[token].rank == int((expected[i] > expected[i, token]).sum()) + 1
        top = sorted((lp for lp in entry.values() if lp.rank <= 3), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == [1, 2, 3]
        assert top[0].logprob == pytest.approx(float(expected[i].max()), abs=1e-4)


def test_no_prompt_logprobs_unless_asked(llm_f32):
    assert llm_f32.generate(PROMPT, SamplingParams(max_tokens=1))[0].prompt_logprobs is None
