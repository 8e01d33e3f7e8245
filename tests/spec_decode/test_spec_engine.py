"""Speculative decoding in the engine, on the tiny model: greedy outputs identical with each proposer, KV
rollback under preemption and aborts (pool invariants after every step), sliding windows, the draft's own pool."""
from __future__ import annotations

import random

import pytest
import torch

from spec_cases import NGRAM, VOCAB, all_free, check_pools, random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.cache.kv_cache import INT4, TURBOQUANT, bytes_per_block
from tokenmill.cache.turboquant import TurboQuant
from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine.spec_decode.proposer import Draft
from tokenmill.engine.spec_decode.speculator import Speculator
from tokenmill.model.loader.checkpoint import load_checkpoint


def _greedy_mix(plain: LLM, prompts: list[list[int]]) -> list[SamplingParams]:
    """Greedy requests with the engine's options: penalties, logprobs, stop strings (cut from the plain output)."""
    texts = [o.outputs[0].text for o in plain.generate([{"prompt_token_ids": p} for p in prompts],
                                                       SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))]
    params = []
    for i, text in enumerate(texts):
        kind = i % 4
        params.append(SamplingParams(
            temperature=0, max_tokens=20 + i % 25, ignore_eos=True,
            repetition_penalty=1.3 if kind == 1 else 1.0, frequency_penalty=0.4 if kind == 1 else 0.0,
            logprobs=3 if kind == 2 else None,
            stop=[text[len(text) // 2: len(text) // 2 + 3]] if kind == 3 and text[len(text) // 2:].strip() else []))
    return params


def _run_batch(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], noise_seed: int = 0):
    """The prompts in one batch, with seeded sampled requests mixed in (not compared)."""
    rng = random.Random(noise_seed)
    mixed = [({"prompt_token_ids": p}, sp) for p, sp in zip(prompts, params)]
    for i in range(len(prompts) // 3):
        mixed.insert(rng.randrange(len(mixed)), ({"prompt_token_ids": prompts[i][:5] + [i]},
                                                 SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=15)))
    outs = llm.generate([m[0] for m in mixed], [m[1] for m in mixed])
    return [o for o, m in zip(outs, mixed) if m[1].temperature == 0]


def _assert_same_outputs(got, expected) -> None:
    for a, b in zip(got, expected):
        ca, cb = a.outputs[0], b.outputs[0]
        assert (ca.token_ids, ca.text, ca.finish_reason) == (cb.token_ids, cb.text, cb.finish_reason)
        if cb.logprobs is not None:
            for la, lb in zip(ca.logprobs, cb.logprobs):
                assert la.keys() == lb.keys()
                for token in la:
                    assert la[token].rank == lb[token].rank
                    assert la[token].logprob == pytest.approx(lb[token].logprob, abs=1e-4)


@pytest.fixture(scope="module")
def greedy_case(plain):
    prompts = random_prompts(24, seed=1)
    params = _greedy_mix(plain, prompts)
    return prompts, params, _run_batch(plain, prompts, params)


@pytest.mark.parametrize("spec", [
    {**NGRAM, "mode": "always"},
    NGRAM,
    {"method": "suffix", "num_speculative_tokens": 6, "mode": "always"},
    {"method": "mix", "num_speculative_tokens": 6, "mode": "always"},
    {"method": "draft_model", "num_speculative_tokens": 4, "mode": "always"},  # the target itself: all accepted
    {"method": "draft_model", "num_speculative_tokens": 3, "num_layers": 1},
    {"method": "draft_model", "num_speculative_tokens": 3, "quantization": "int8", "mode": "always"},
], ids=["ngram-always", "ngram-auto", "suffix", "mix", "draft-self", "draft-1-layer", "draft-int8"])
def test_greedy_outputs_identical_with_speculation(tiny_dir, greedy_case, spec):
    prompts, params, expected = greedy_case
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24, speculative_config=spec)
    got = _run_batch(llm, prompts, params)
    _assert_same_outputs(got, expected)
    stats = llm.engine.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens > 0
    assert sum(stats.spec_accepted_per_pos) == stats.spec_num_accepted_tokens
    assert list(stats.spec_accepted_per_pos) == sorted(stats.spec_accepted_per_pos, reverse=True)
    by_method = stats.spec_by_method  # per proposer, summing to the totals
    assert [c.method for c in by_method] == list(llm.speculative_config.proposer_methods)
    assert sum(c.num_accepted_tokens for c in by_method) == stats.spec_num_accepted_tokens
    assert sum(c.num_drafts for c in by_method) == stats.spec_num_drafts
    if spec.get("model") is None and spec["method"] == "draft_model" and "num_layers" not in spec \
            and "quantization" not in spec:
        assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
    all_free(llm.engine)


class NoisyOracle:
    """Proposes each request's true greedy continuation, corrupting each token with probability `noise`:
    acceptance is controlled, so rollbacks happen at every position."""

    def __init__(self, references: dict[tuple[int, ...], list[int]], noise: float, seed: int) -> None:
        self.references, self.noise, self.rng = references, noise, random.Random(seed)

    def propose(self, requests, num_tokens):
        drafts = []
        for request, k in zip(requests, num_tokens):
            full = self.references[tuple(request.prompt_token_ids)]
            done = len(request.output_ids)
            tokens = [t if self.rng.random() > self.noise else self.rng.randrange(VOCAB) for t in full[done:done + k]]
            drafts.append(Draft(tokens))
        return drafts

    def learn(self, finished):
        pass

    def retain(self, request_ids):
        pass


def _oracle_engine(llm: LLM, references, cache: CacheConfig, seed: int) -> LLMEngine:
    engine = LLMEngine(llm.model, llm.tokenizer, llm.dtype, cache,
                       SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=96),
                       SpeculativeConfig("ngram", 5, mode="always"))
    engine.speculator = Speculator(engine.speculator.config, {"ngram": NoisyOracle(references, 0.3, seed)})
    return engine


def _plain_tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams, cache: CacheConfig) -> list[list[int]]:
    """Each prompt's tokens from an engine with `cache` (room for all) and no speculation."""
    engine = LLMEngine(llm.model, llm.tokenizer, llm.dtype, CacheConfig(16, 2**24, cache.enable_prefix_caching,
                                                                        cache.kv_cache_dtype), SchedulerConfig())
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [done[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("prefix_caching,kv_cache_dtype", [(True, "auto"), (False, "auto"), (True, "int8"),
                                                            (True, "int4"), (True, "turboquant")])
def test_rollbacks_preemption_and_aborts_keep_tokens_and_pools_right(plain, prefix_caching, kv_cache_dtype):
    """Requests sharing prefixes, a cache too small for all of them (preemptions), random aborts: greedy tokens
    equal the plain engine's (with the same cache type), pool invariants hold after every step, and every block
    is free at the end. The rotated caches keep recent rows (their twins' blocks counted by the pool checks), so
    their cache is larger: a 96-token chunk's twins alone take 40 blocks."""
    rng = random.Random(4)
    shared = random_prompts(3, seed=7)
    prompts = [shared[i % 3] * 2 + random_prompts(1, seed=100 + i)[0][:rng.randrange(1, 20)] for i in range(14)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    element = {"int8": torch.int8, "int4": INT4, "turboquant": TURBOQUANT}.get(kv_cache_dtype, torch.float32)
    turbo = TurboQuant(plain.config.head_dim) if element == TURBOQUANT else None
    blocks = 72 if element in (INT4, TURBOQUANT) else 24
    cache = CacheConfig(16, blocks * bytes_per_block(plain.config, 16, element, turbo), prefix_caching, kv_cache_dtype)
    expected = _plain_tokens(plain, prompts, params, cache)
    references = {tuple(p): e for p, e in zip(prompts, expected)}
    engine = _oracle_engine(plain, references, cache, seed=5)
    done, aborted = {}, set()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        check_pools(engine)
        steps += 1
        if steps % 9 == 0 and len(aborted) < 3:
            victim = next((r.request_id for r in reversed(engine.scheduler.running)), None)
            if victim is not None:
                engine.abort(victim)
                aborted.add(victim)
                check_pools(engine)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and aborted
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert stats.spec_accepted_per_pos[4] > 0  # whole drafts were accepted, too
    for i in range(len(prompts)):
        if str(i) not in aborted:
            assert done[str(i)] == expected[i], f"request {i}"
    if prefix_caching:
        assert stats.prefix_cache_hits > 0
    all_free(engine)


def test_sliding_window_model_rolls_back_right(tmp_path, plain):
    """Gemma 3 layout (sliding groups whose old blocks are NULL, window 8 < draft chunk + context): greedy
    tokens under noisy drafts equal the plain engine's, pools stay consistent."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.1, num_hidden_layers=7,
        sliding_window=8)).eval()
    model.save_pretrained(str(tmp_path))
    load_checkpoint().tokenizer.save(tmp_path)
    gemma = LLM(str(tmp_path), dtype="float32", block_size=4, max_num_batched_tokens=96)
    assert len(gemma.engine.kv_cache.layout.groups) > 1
    prompts = random_prompts(8, seed=21)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in gemma.generate([{"prompt_token_ids": p} for p in prompts], params)]
    engine = _oracle_engine(gemma, {tuple(p): e for p, e in zip(prompts, expected)}, CacheConfig(4, 2**22), seed=6)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        check_pools(engine)
    assert [done[str(i)] for i in range(len(prompts))] == expected
    assert 0 < engine.stats().spec_num_accepted_tokens < engine.stats().spec_num_draft_tokens
    all_free(engine)


def test_draft_model_pool_is_freed_after_aborts_and_preemption(tiny_dir, plain):
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=20 * 2 * 2 * 16 * 2 * 32 * 4,
              max_num_batched_tokens=64, speculative_config={"method": "draft_model", "num_speculative_tokens": 3,
                                                            "num_layers": 1, "mode": "always"})
    engine = llm.engine
    prompts = random_prompts(10, seed=9)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.7, seed=i, max_tokens=30, ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        check_pools(engine)
        steps += 1
        if steps == 6:
            engine.abort("3")
    assert engine.stats().num_preemptions > 0
    all_free(engine)


def test_seeded_sampling_under_speculation_is_reproducible(tiny_dir):
    spec = {"method": "draft_model", "num_speculative_tokens": 3, "num_layers": 1, "mode": "always"}
    runs = []
    for _ in range(2):
        llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**22, speculative_config=spec)
        outs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(6, seed=3)],
                            [SamplingParams(temperature=1.0, top_k=20, seed=i, max_tokens=12) for i in range(6)])
        runs.append([o.outputs[0].token_ids for o in outs])
    assert runs[0] == runs[1]
