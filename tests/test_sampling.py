"""Sampling: the sampler's arithmetic on hand-made logits, then SamplingParams end to end on the real model."""
from __future__ import annotations

import math

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.model.sampler import StepLogits, apply_penalties, filter_logits, sample

NEG_INF = float("-inf")


def _kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits.tolist()) if v != NEG_INF]


def _logits(probs: list[float], shift: float = 0.0) -> torch.Tensor:
    """Logits whose softmax is exactly `probs` (up to float rounding); `shift` must not matter."""
    return torch.tensor([math.log(p) + shift for p in probs], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- unit: filtering


@pytest.mark.parametrize("top_k,kept", [(1, [1]), (2, [1, 4]), (3, [1, 2, 4]), (5, list(range(5))),
                                        (9, list(range(5))), (-1, list(range(5))), (0, list(range(5)))])
def test_top_k_keeps_the_k_largest(top_k, kept):
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5])
    out = filter_logits(logits.clone(), SamplingParams(top_k=top_k))
    assert _kept(out) == kept
    assert torch.equal(out[kept], logits[kept])  # survivors are untouched


@pytest.mark.parametrize("top_p,kept", [
    (1e-6, [2]),  # always at least the most likely token
    (0.35, [2]),
    (0.5, [2, 0]),  # 0.4 < 0.5, so the next token is needed
    (0.75, [2, 0, 3]),  # 0.4 + 0.3 = 0.7 < 0.75
    (0.95, [2, 0, 3, 1]),
    (1.0, [2, 0, 3, 1]),
])
def test_top_p_keeps_smallest_set_reaching_mass(top_p, kept):
    # shuffled so the result must be scattered back to vocabulary order
    logits = _logits([0.3, 0.1, 0.4, 0.2], shift=3.0)
    out = filter_logits(logits, SamplingParams(top_p=top_p))
    assert set(_kept(out)) == set(kept)


@pytest.mark.parametrize("top_p,kept", [(0.5, [0]), (0.75, [0, 1]), (0.875, [0, 1, 2]), (0.95, [0, 1, 2, 3, 4])])
def test_top_p_exact_boundary_stops_when_mass_is_reached(top_p, kept):
    """Powers of two are exact in float32: with mass exactly top_p the set is complete, the next token is dropped."""
    out = filter_logits(_logits([0.5, 0.25, 0.125, 0.0625, 0.0625]), SamplingParams(top_p=top_p))
    assert _kept(out) == kept


def test_top_p_applies_to_distribution_renormalised_after_top_k():
    # after top_k=2 the survivors have probs 4/7 and 3/7; 4/7 >= 0.5 so top_p keeps one token.
    # (without renormalisation 0.4 < 0.5 and two tokens would survive)
    out = filter_logits(_logits([0.4, 0.3, 0.2, 0.1]), SamplingParams(top_k=2, top_p=0.5))
    assert _kept(out) == [0]


@pytest.mark.parametrize("min_p,kept", [(0.0, [0, 1, 2, 3]), (0.2, [0, 1, 2, 3]), (0.3, [0, 1, 2]),
                                        (0.6, [0, 1]), (0.9, [0]), (1.0, [0])])
def test_min_p_drops_tokens_below_fraction_of_top_probability(min_p, kept):
    # threshold = min_p * 0.4: 0.08, 0.12, 0.24, 0.36, 0.4
    out = filter_logits(_logits([0.4, 0.3, 0.2, 0.1], shift=-1.0), SamplingParams(min_p=min_p))
    assert _kept(out) == kept


# ---------------------------------------------------------------------------------------------- unit: penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, -2.0, 3.0, 1.5])
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1, 1],
                          output_ids=[3, 3])
    # seen: 0 (prompt), 1 (prompt, twice: penalised once), 3 (output, twice); unseen 2, 4, 5 unchanged
    assert out.tolist() == [1.0, -2.0, 0.5, -4.0, 3.0, 1.5]


def test_repetition_penalty_below_one_rewards_seen_tokens():
    out = apply_penalties(torch.tensor([2.0, -1.0, 0.5]), SamplingParams(repetition_penalty=0.5), [0], [1])
    assert out.tolist() == [4.0, -0.5, 0.5]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits.clone(), params, prompt_ids=[0, 0, 1], output_ids=[2, 2, 2, 4])
    # token 2: 3 * 0.5 + 0.25 = 1.75; token 4: 0.5 + 0.25 = 0.75; prompt-only tokens 0 and 1 untouched
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, -0.75, 1.0, 0.25]), rtol=0, atol=1e-6)


def test_negative_presence_and_frequency_penalties_raise_logits():
    out = apply_penalties(torch.zeros(3), SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5), [], [1, 1])
    torch.testing.assert_close(out, torch.tensor([0.0, 2.5, 0.0]), rtol=0, atol=1e-6)


def test_no_penalty_means_logits_unchanged():
    logits = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(apply_penalties(logits.clone(), SamplingParams(), [0, 1], [2, 2]), logits)


def test_greedy_choice_follows_penalties():
    logits = torch.tensor([3.0, 2.5, 1.0])
    assert sample(StepLogits(logits[None]), 0, SamplingParams(temperature=0), [5], [], None).token_id == 0
    assert sample(StepLogits(logits[None]), 0, SamplingParams(temperature=0, repetition_penalty=1.5),
                  [0], [], None).token_id == 1
    assert sample(StepLogits(logits[None]), 0, SamplingParams(temperature=0, presence_penalty=1.0),
                  [], [0], None).token_id == 1
    # presence/frequency penalties ignore the prompt
    assert sample(StepLogits(logits[None]), 0, SamplingParams(temperature=0, presence_penalty=1.0),
                  [0], [], None).token_id == 0


# ---------------------------------------------------------------------------------------------- unit: logprobs


def test_logprobs_report_raw_distribution_rank_and_top_n_in_order():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, 1.5])
    raw = logits.log_softmax(-1)
    # the repetition penalty pushes token 0 down to 0.3, so greedy picks token 1 (2nd most likely in the raw model)
    got = sample(StepLogits(logits[None]), 0, SamplingParams(temperature=0, repetition_penalty=10.0, logprobs=3),
                 [0], [], None)
    assert got.token_id == 1
    assert got.logprob == pytest.approx(float(raw[1]), abs=1e-6)
    assert got.rank == 2
    assert [t for t, _ in got.top] == [0, 1, 4]
    assert [lp for _, lp in got.top] == pytest.approx(raw[[0, 1, 4]].tolist(), abs=1e-6)


def test_logprobs_are_not_temperature_scaled_and_rank_counts_better_tokens():
    logits = torch.tensor([0.0, 2.0, 1.0, 3.0])
    raw = logits.log_softmax(-1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        got = sample(StepLogits(logits[None]), 0, SamplingParams(temperature=2.0, logprobs=1), [], [], gen)
        assert got.logprob == pytest.approx(float(raw[got.token_id]), abs=1e-6)
        assert got.rank == 1 + int((raw > raw[got.token_id]).sum())
        assert got.top == [(3, pytest.approx(float(raw[3]), abs=1e-6))]


def test_logprobs_zero_gives_chosen_only_and_none_gives_no_alternatives():
    logits = torch.tensor([0.0, 2.0, 1.0])
    zero = sample(StepLogits(logits[None]), 0, SamplingParams(temperature=0, logprobs=0), [], [], None)
    assert (zero.token_id, zero.rank, zero.top) == (1, 1, [])
    none = sample(StepLogits(logits[None]), 0, SamplingParams(temperature=0), [], [], None)
    assert none.top == []
    assert none.logprob == pytest.approx(float(logits.log_softmax(-1)[1]), abs=1e-6)


def test_each_row_of_a_step_samples_as_if_alone():
    """StepLogits reduces all rows at once; every row's token and logprobs must be what that row alone gives."""
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    step = StepLogits(logits)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=2),
                   SamplingParams(temperature=0, presence_penalty=2.0)):
        for row in range(5):
            alone = sample(StepLogits(logits[row][None]), 0, params, [], [3], None)
            together = sample(step, row, params, [], [3], None)
            raw = logits[row].log_softmax(-1)
            assert together.token_id == alone.token_id
            assert together.logprob == pytest.approx(float(raw[together.token_id]), abs=1e-5)
            assert together.top == [(t, pytest.approx(float(raw[t]), abs=1e-5)) for t, _ in alone.top]


# ---------------------------------------------------------------------------------------------- unit: sampling


def _draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = [sample(StepLogits(logits[None]), 0, params, [], [], gen).token_id for _ in range(n)]
    return torch.bincount(torch.tensor(ids), minlength=logits.numel()).double() / n


DRAWS = 6000  # std of a frequency <= sqrt(0.25 / 6000) = 0.0065; tolerance 0.025 is ~4 sigma


def test_temperature_one_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    freq = _draw(logits, SamplingParams(temperature=1.0), DRAWS, seed=1234)
    torch.testing.assert_close(freq, logits.double().softmax(-1), rtol=0, atol=0.025)


def test_temperature_half_sharpens_distribution():
    logits = torch.tensor([1.0, 0.5, 0.0])
    freq = _draw(logits, SamplingParams(temperature=0.5), DRAWS, seed=7)
    torch.testing.assert_close(freq, (logits.double() / 0.5).softmax(-1), rtol=0, atol=0.025)


def test_top_k_sampling_draws_only_from_renormalised_top_k():
    logits = _logits([0.4, 0.3, 0.2, 0.1])
    freq = _draw(logits, SamplingParams(temperature=1.0, top_k=2), DRAWS, seed=99)
    torch.testing.assert_close(freq, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0], dtype=torch.double), rtol=0, atol=0.025)
    assert freq[2] == 0 and freq[3] == 0


def test_seeded_generator_is_reproducible():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    a = [int(v) for v in (_draw(logits, SamplingParams(), 200, seed=5) * 200).round()]
    b = [int(v) for v in (_draw(logits, SamplingParams(), 200, seed=5) * 200).round()]
    c = [int(v) for v in (_draw(logits, SamplingParams(), 200, seed=6) * 200).round()]
    assert a == b
    assert a != c


# ---------------------------------------------------------------------------------------------- real model

PROMPT = "The capital of France is"
STORY = "Once upon a time"


def _first(llm, prompt, params):
    return llm.generate(prompt, params)[0].outputs[0]


@pytest.fixture(scope="module")
def greedy(llm_f32):
    """16 greedy tokens of PROMPT, never stopping early: the reference the stop tests cut."""
    out = _first(llm_f32, PROMPT, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert len(out.token_ids) == 16 and out.finish_reason == "length"
    return out


@pytest.fixture(scope="module")
def seeded(llm_f32):
    """Temperature 1 for seeds 0, 1, 2 (32 tokens, one call), then seed 0 again in a later call (16 tokens)."""
    def params(seed, n):
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=n, ignore_eos=True)

    outs = llm_f32.generate([STORY] * 3, [params(s, 32) for s in (0, 1, 2)])
    torch.manual_seed(999)  # the global RNG must not matter to seeded requests
    outs += llm_f32.generate(STORY, params(0, 16))
    return [o.outputs[0].token_ids for o in outs]


def test_same_seed_same_output(seeded):
    """Token i depends only on the seed and the tokens before it, so a shorter rerun is a prefix."""
    assert len(seeded[0]) == 32 and len(seeded[3]) == 16
    assert seeded[3] == seeded[0][:16]


def test_different_seeds_different_outputs(seeded):
    assert len({tuple(t) for t in seeded[:3]}) == 3


def test_top_k_one_at_temperature_one_equals_greedy(llm_f32, greedy):
    out = _first(llm_f32, PROMPT, SamplingParams(temperature=1.0, top_k=1, seed=123, max_tokens=8, ignore_eos=True))
    assert out.token_ids == greedy.token_ids[:8]


def test_stop_string_cuts_text_before_it(llm_f32, greedy):
    text = greedy.text
    stop = text[len(text) // 3: len(text) // 3 + 5]
    before = text[: text.index(stop)]
    assert before, "the stop string must sit in the middle of the text"
    out = _first(llm_f32, PROMPT, SamplingParams(temperature=0, max_tokens=16, stop=[stop, "never appears here"]))
    assert out.text == before
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert len(out.token_ids) < 16
    assert out.token_ids == greedy.token_ids[: len(out.token_ids)]
    # generation stopped at the token that completed the stop string, not later
    assert stop in llm_f32.tokenizer.decode(out.token_ids)
    assert stop not in llm_f32.tokenizer.decode(out.token_ids[:-1])


def test_include_stop_str_in_output(llm_f32, greedy):
    text = greedy.text
    stop = text[len(text) // 3: len(text) // 3 + 5]
    out = _first(llm_f32, PROMPT,
                 SamplingParams(temperature=0, max_tokens=16, stop=stop, include_stop_str_in_output=True))
    assert out.text == text[: text.index(stop)] + stop
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_stop_token_ids(llm_f32, greedy):
    stop_id = greedy.token_ids[4]
    k = greedy.token_ids.index(stop_id)  # the first occurrence ends it (usually index 4 itself)
    out = _first(llm_f32, PROMPT, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id]))
    assert out.token_ids == greedy.token_ids[: k + 1]
    assert out.token_ids[-1] == stop_id
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    assert out.text == llm_f32.tokenizer.decode(greedy.token_ids[:k])  # the stop token's text is not output


def test_max_tokens_finishes_with_length(llm_f32, greedy):
    out = _first(llm_f32, PROMPT, SamplingParams(temperature=0, max_tokens=5))
    assert out.token_ids == greedy.token_ids[:5]
    assert out.finish_reason == "length"
    assert out.stop_reason is None
    assert out.text == llm_f32.tokenizer.decode(greedy.token_ids[:5])


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def chat_answer(llm_f32):
    return llm_f32.chat(QUESTION, SamplingParams(temperature=0, max_tokens=40))[0]


def test_chat(llm_f32, chat_answer):
    out = chat_answer.outputs[0]
    assert "Paris" in out.text
    assert chat_answer.prompt_token_ids == llm_f32.tokenizer.apply_chat_template(QUESTION, tokenize=True)
    assert out.finish_reason == "stop"
    assert out.stop_reason is None  # the model's own end token, as vLLM reports it
    assert out.token_ids[-1] in llm_f32.tokenizer.stop_token_ids
    assert "<|im_end|>" not in out.text


def test_ignore_eos_generates_past_end_of_turn(llm_f32, chat_answer):
    answer = chat_answer.outputs[0].token_ids
    max_tokens = len(answer) + 3
    out = llm_f32.generate({"prompt_token_ids": chat_answer.prompt_token_ids},
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == max_tokens
    assert out.token_ids[: len(answer)] == answer  # the EOS is among the tokens, and generation went on


def test_logprobs(llm_f32, greedy):
    num = 4
    out = _first(llm_f32, PROMPT, SamplingParams(temperature=0, max_tokens=num, ignore_eos=True, logprobs=3))
    assert out.token_ids == greedy.token_ids[:num]
    assert len(out.logprobs) == num
    # reference: the model's own log-softmax at each generated position
    ids = llm_f32.tokenizer.encode(PROMPT) + out.token_ids
    logits = llm_f32.score(ids)
    ref = logits[-num - 1:-1].log_softmax(-1)
    total = 0.0
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top3 = ref[step].topk(3).indices.tolist()
        assert token in entry and set(top3) <= set(entry) and len(entry) == len(set(top3) | {token})
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert sorted(entry, key=lambda t: entry[t].rank) == top3
        for tid, lp in entry.items():
            assert lp.decoded_token == llm_f32.tokenizer.decode([tid], skip_special_tokens=False)
            assert lp.logprob == pytest.approx(float(ref[step, tid]), abs=1e-3)
            assert lp.rank == 1 + int((ref[step] > ref[step, tid]).sum())
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_n_two_gives_two_outputs(llm_f32):
    res = llm_f32.generate(STORY, SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True))
    assert len(res) == 1
    outs = res[0].outputs
    assert [o.index for o in outs] == [0, 1]
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in outs)
    assert outs[0].token_ids != outs[1].token_ids


def test_list_of_prompts_returns_outputs_in_order(llm_f32, greedy):
    prompts = ["def fibonacci(n):", PROMPT, "1, 2, 3, 4,"]
    res = llm_f32.generate(prompts, SamplingParams(temperature=0, max_tokens=4))
    assert [r.prompt for r in res] == prompts
    assert [r.prompt_token_ids for r in res] == [llm_f32.tokenizer.encode(p) for p in prompts]
    assert len({r.request_id for r in res}) == 3
    assert all(r.finished for r in res)
    assert res[1].outputs[0].token_ids == greedy.token_ids[:4]
    assert res[2].outputs[0].text.strip().startswith("5")


def test_token_id_prompt_equals_text_prompt(llm_f32, greedy):
    ids = llm_f32.tokenizer.encode(PROMPT)
    res = llm_f32.generate([{"prompt_token_ids": ids}, {"prompt": PROMPT}], SamplingParams(temperature=0, max_tokens=4))
    for r in res:
        assert r.prompt_token_ids == ids
        assert r.outputs[0].token_ids == greedy.token_ids[:4]
        assert r.outputs[0].text == llm_f32.tokenizer.decode(greedy.token_ids[:4])


def test_engine_seed_repeats_unseeded_requests():
    """LLM(seed=...) seeds the draws of requests without a seed of their own, as vLLM's."""
    params = SamplingParams(temperature=1.0, max_tokens=12)
    first, second = (LLM(dtype="float32", seed=11).generate(PROMPT, params)[0].outputs[0].token_ids for _ in range(2))
    assert first == second
