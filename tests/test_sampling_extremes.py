"""Sampling values that overflow the arithmetic or are not numbers at all: a token is still drawn from a valid
distribution, or the value is refused naming its field (issue 17: one request's values must not fail a batch)."""
from __future__ import annotations

import math

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.model.sampler import StepLogits, sample


@pytest.mark.parametrize("extreme", [dict(temperature=1e-300), dict(temperature=1e-6), dict(temperature=1e308),
                                     dict(top_p=1e-300), dict(repetition_penalty=1e-300),
                                     dict(repetition_penalty=1e308), dict(min_p=1.0, temperature=1e-4),
                                     dict(repetition_penalty=1e-300, temperature=1e-4, top_p=1e-300)])
def test_extreme_finite_values_still_draw_a_valid_token(extreme):
    """Values that overflow the arithmetic (logits / 1e-300, a penalty of 1e308) must not make NaN or empty
    distributions: the token comes from the best remaining logits, never from an exception."""
    logits = torch.tensor([2.0, -1.0, 3.0, 0.5, -4.0])
    params = SamplingParams(**extreme)
    for seed in range(20):
        token = sample(StepLogits(logits[None]), 0, params, [0, 1, 2, 3, 4], [2], torch.Generator().manual_seed(seed))
        assert 0 <= token.token_id < 5 and math.isfinite(token.logprob)


def test_tiny_temperature_is_greedy():
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    logits = torch.tensor([2.0, -1.0, 3.0, 2.9])
    assert {sample(StepLogits(logits[None]), 0, SamplingParams(temperature=1e-300), [], [], None).token_id
            for _ in range(5)} == {2}


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_are_rejected_naming_the_field(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
        SamplingParams(**{name: value})
