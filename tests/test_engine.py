"""The paged engine on the real model (float32): batch invariance, preemption, prefix caching, leaks, joins."""
from __future__ import annotations

import random

import pytest

from tokenmill import SamplingParams
from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.engine import LLMEngine

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
TEXT = (
    "The history of computing is a story of abstraction layered on abstraction. Early machines were programmed "
    "by rewiring panels; then came stored programs, assemblers, compilers and operating systems. Each layer hid "
    "the one below it and let more people build more things. Networks joined the machines together, and the web "
    "put a document viewer in front of everyone. "
)


@pytest.fixture(scope="module")
def corpus_ids(llm_f32) -> list[int]:
    ids = llm_f32.tokenizer.encode(TEXT * 30)
    assert len(ids) > 1200
    return ids


def _engine(llm, **kw) -> LLMEngine:
    """A fresh engine (own KV cache and scheduler) sharing the already-loaded weights."""
    cache = CacheConfig(**{k: v for k, v in kw.items()
                           if k in ("block_size", "kv_cache_memory", "enable_prefix_caching")})
    sched = SchedulerConfig(**{k: v for k, v in kw.items()
                               if k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len")})
    return LLMEngine(llm.model, llm.tokenizer, llm.dtype, cache, sched)


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def _alone(llm, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    result = []
    for ids in prompts:
        engine = _engine(llm, kv_cache_memory=256 * 2**20, enable_prefix_caching=False)
        engine.add_request("solo", ids, params)
        result.append(_run(engine)["solo"])
    return result


def _lengths_prompts(corpus_ids: list[int], lengths: list[int]) -> list[list[int]]:
    return [corpus_ids[i * 7 % 100: i * 7 % 100 + n] for i, n in enumerate(lengths)]


LENGTHS = [1, 2, 3, 5, 8, 13, 15, 16, 17, 31, 32, 33, 47, 64, 90, 127, 128, 129, 200, 255,
           300, 380, 450, 511, 512, 513, 640, 777, 850, 999, 1024, 1100]


def test_batch_invariance_32_prompts_of_very_different_lengths(llm_f32, corpus_ids):
    prompts = _lengths_prompts(corpus_ids, LENGTHS)
    assert len(prompts) == 32 and max(map(len, prompts)) > 1000
    expected = _alone(llm_f32, prompts)
    engine = _engine(llm_f32, enable_prefix_caching=False, max_num_batched_tokens=512)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, GREEDY)
    got = _run(engine)
    mismatched = [i for i in range(32) if got[str(i)] != expected[i]]
    assert not mismatched, f"prompt lengths {[LENGTHS[i] for i in mismatched]} differ in a batch"


def test_preemption_keeps_greedy_tokens(llm_f32, corpus_ids):
    prompts = _lengths_prompts(corpus_ids, [150, 150, 150, 140, 60])
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = _alone(llm_f32, prompts, params)
    block_bytes = 2 * 30 * 16 * 3 * 64 * 4
    # 40 blocks = 640 slots: the first four prompts are admitted (39 blocks), then their decodes outgrow the cache
    engine = _engine(llm_f32, kv_cache_memory=40 * block_bytes, max_num_batched_tokens=1024)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    got = _run(engine)
    assert engine.stats().num_preemptions > 0
    assert [got[str(i)] for i in range(len(prompts))] == expected
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.num_blocks


def test_prefix_cache_reuses_a_500_token_prefix(llm_f32, corpus_ids):
    prefix = corpus_ids[:500]
    first, second = prefix + corpus_ids[600:620], prefix + corpus_ids[700:730]
    results = {}
    for caching in (False, True):
        engine = _engine(llm_f32, enable_prefix_caching=caching)
        engine.add_request("a", first, GREEDY)
        out_a = _run(engine)["a"]
        before = engine.stats().num_computed_tokens
        engine.add_request("b", second, GREEDY)
        finished = []
        while engine.has_unfinished():
            finished += [o for o in engine.step() if o.finished]
        computed_for_b = engine.stats().num_computed_tokens - before
        results[caching] = (out_a, finished[0].outputs[0].token_ids, finished[0].num_cached_tokens, computed_for_b)
    (a_off, b_off, cached_off, computed_off), (a_on, b_on, cached_on, computed_on) = results[False], results[True]
    assert (a_on, b_on) == (a_off, b_off)  # caching never changes tokens
    assert cached_off == 0 and computed_off == len(second) + GREEDY.max_tokens - 1
    assert cached_on == 496  # 31 full blocks of 16 inside the shared 500 tokens
    assert computed_on == len(second) - 496 + GREEDY.max_tokens - 1  # only the new suffix, then decodes


def test_no_block_leaks_with_random_aborts(llm_f32, corpus_ids):
    rng = random.Random(0)
    aborted_mid_prefill = False
    engine = _engine(llm_f32, max_num_batched_tokens=64, kv_cache_memory=64 * 2**20)
    live = set()
    for i in range(24):
        n = rng.choice([5, 40, 150, 300])
        engine.add_request(str(i), corpus_ids[i: i + n],
                           SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randint(1, 12)))
        live.add(str(i))
        for _ in range(rng.randint(0, 3)):
            for out in engine.step():
                if out.finished:
                    live.discard(out.request_id)
        if live and rng.random() < 0.4:
            victim = rng.choice(sorted(live))
            mid_prefill = any(r.parent_id == victim and r.num_computed_tokens < r.num_prompt_tokens
                              for r in engine.scheduler.running)
            engine.abort(victim)
            live.discard(victim)
            if mid_prefill:
                aborted_mid_prefill = True
    _run(engine)
    assert aborted_mid_prefill
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.num_blocks
    assert not engine.kv_manager.block_tables and not engine.scheduler.running and not engine.scheduler.waiting


def test_request_added_mid_decode_joins_next_step(llm_f32, corpus_ids):
    engine = _engine(llm_f32)
    engine.add_request("a", corpus_ids[:20], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    engine.step()
    engine.step()
    engine.add_request("b", corpus_ids[50:60], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    outs = {o.request_id: o for o in engine.step()}
    assert set(outs) == {"a", "b"}
    assert len(outs["a"].outputs[0].token_ids) == 3 and len(outs["b"].outputs[0].token_ids) == 1


def test_priority_orders_admission(llm_f32, corpus_ids):
    engine = _engine(llm_f32, max_num_seqs=1)
    engine.add_request("low", corpus_ids[:10], SamplingParams(temperature=0, max_tokens=2), priority=5)
    engine.add_request("high", corpus_ids[10:20], SamplingParams(temperature=0, max_tokens=2), priority=0)
    first = engine.step()
    assert [o.request_id for o in first] == ["high"]


def test_chunked_prefill_never_exceeds_budget_and_decodes_keep_flowing(llm_f32, corpus_ids):
    engine = _engine(llm_f32, max_num_batched_tokens=128)
    engine.add_request("short", corpus_ids[:10], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine.step()
    engine.add_request("long", corpus_ids[:1000], SamplingParams(temperature=0, max_tokens=1))
    steps = 0
    while True:
        before = engine.stats().num_computed_tokens
        produced = [o.request_id for o in engine.step()]
        steps += 1
        assert engine.stats().num_computed_tokens - before <= 128
        assert "short" in produced  # the decode is never stalled by the long prompt
        if "long" in produced:
            break
    assert steps == 8  # 1000 prompt tokens in chunks of 127 beside one decode token


def test_oversized_requests_get_clear_errors(llm_f32, corpus_ids):
    engine = _engine(llm_f32, kv_cache_memory=8 * 2 * 30 * 16 * 3 * 64 * 4)  # 8 blocks = 128 tokens
    assert engine.max_model_len == 128  # lowered to what the cache holds, not left at the model's 8192
    with pytest.raises(ValueError, match="max_model_len is 128"):
        engine.add_request("big", corpus_ids[:200], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        _engine(llm_f32).add_request("long", corpus_ids * 8, GREEDY)
    engine.add_request("fits", corpus_ids[:100], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
    out = _run(engine)["fits"]
    assert len(out) == 128 - 100  # capped by the cache, finishes instead of preempting itself forever


def test_a_failing_row_fails_only_its_own_request(llm_f32, corpus_ids, monkeypatch):
    """One request whose sampling raises ends with an error; the others in the same steps finish unchanged."""
    import tokenmill.engine.engine as engine_module

    prompts = _lengths_prompts(corpus_ids, [5, 9, 13])
    expected = _alone(llm_f32, prompts)
    engine = _engine(llm_f32, kv_cache_memory=256 * 2**20)
    real_sample = engine_module.sample

    def sample(step, row, params, prompt_ids, output_ids, generator, *rules):
        if params.seed == 666 and len(output_ids) == 2:
            raise RuntimeError("poisoned row")
        return real_sample(step, row, params, prompt_ids, output_ids, generator, *rules)

    monkeypatch.setattr(engine_module, "sample", sample)
    engine.add_request("poison", prompts[0], SamplingParams(temperature=0.5, seed=666, max_tokens=32, n=2))
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, GREEDY)
    done, errors = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
                errors[out.request_id] = out.error
    assert "poisoned row" in errors["poison"] and len(done["poison"]) == 2
    assert [done[str(i)] for i in range(3)] == expected and not any(errors[str(i)] for i in range(3))
    assert engine.kv_manager.num_used_blocks() == 0 and not engine.parents


def test_an_explicit_max_model_len_the_cache_cannot_hold_is_refused(llm_f32):
    with pytest.raises(ValueError, match="max_model_len=1024 does not fit in the KV cache.*at most 128 tokens"):
        _engine(llm_f32, kv_cache_memory=8 * 2 * 30 * 16 * 3 * 64 * 4, max_model_len=1024)


def test_higher_priority_preempts_a_running_request(llm_f32):
    """vLLM's priority policy under --max-num-seqs 1: a more urgent request submitted while a less urgent one runs
    finishes first; the preempted one resumes (recomputed) and its tokens equal what it gives alone."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = _run_alone(llm_f32, params)
    engine = _engine(llm_f32, max_num_seqs=1)
    engine.add_request("low", "Once upon a time", params, priority=5)
    for _ in range(4):
        engine.step()
    engine.add_request("high", "The weather today", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       priority=0)
    finished = []
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
                outputs[out.request_id] = out.outputs[0].token_ids
    assert finished == ["high", "low"]
    assert engine.stats().num_preemptions == 1
    assert outputs["low"] == alone


def _run_alone(llm, params: SamplingParams) -> list[int]:
    return llm.generate("Once upon a time", params)[0].outputs[0].token_ids


def test_n_completions_compute_the_prompt_once(llm_f32):
    """n = 4 on a 300-token prompt: one child computes the prompt, the other three map its full blocks from the
    prefix cache; the samples differ, and each equals a single request seeded as that child is (seed + index)."""
    prompt = list(range(1000, 1300))
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    engine = _engine(llm_f32, enable_prefix_caching=True)
    engine.add_request("fan", prompt, params)
    final = None
    while engine.has_unfinished():
        final = engine.step()[-1]
    stats = engine.stats()
    assert stats.prefix_cache_hits >= 3 * 256, stats
    samples = [c.token_ids for c in final.outputs]
    assert len({tuple(s) for s in samples}) == 4
    for index, sample_ids in enumerate(samples):
        single = SamplingParams(temperature=1.0, seed=7 + index, max_tokens=8, ignore_eos=True)
        assert llm_f32.generate({"prompt_token_ids": prompt}, single)[0].outputs[0].token_ids == sample_ids
