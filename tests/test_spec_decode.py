"""Speculative decoding: the proposers, exact verification, KV rollback, the adaptive controller, metrics.

Fast tests use a tiny random Llama with a 512-token vocabulary (prompts are token ids; the default model's
tokenizer decodes them). Distribution tests are chi-square goodness-of-fit tests at significance level
ALPHA = 0.001 against the exact target distribution; every run is seeded, so they are deterministic.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from tinymodel import write_tiny_llama

from tokenmill import LLM, SamplingParams
from tokenmill.cache.kv_cache_manager import NULL_BLOCK
from tokenmill.cache.prefix_cache import extend_block_hashes
from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.model.loader import load_checkpoint
from tokenmill.model.sampler import process_logits
from tokenmill.spec_decode import speculator as speculator_module
from tokenmill.spec_decode.adaptive import WARMUP_STEPS, AdaptiveController
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.ngram import ngram_lookup
from tokenmill.spec_decode.proposer import Draft
from tokenmill.spec_decode.rejection import greedy_verify, rejection_sample
from tokenmill.spec_decode.speculator import Speculator

ALPHA = 0.001
VOCAB = 512
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


# ---------------------------------------------------------------------------------------------- config


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
    ("{not json", "JSON"),
    ([1, 2], "dict"),
])
def test_bad_config_names_the_field(value, field):
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig.parse(value)


def test_config_from_json_and_off_by_default():
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 7}')
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_max, config.mode) == ("ngram", 4, 7, "auto")
    assert SpeculativeConfig.parse(None) is None


# ---------------------------------------------------------------------------------------------- n-gram lookup


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


# ---------------------------------------------------------------------------------------------- rejection sampler


def _chi_square_pvalue(observed: Counter, expected: dict, n: int) -> float:
    """Goodness of fit of counts to probabilities; cells expecting < 5 are pooled into one. An outcome outside
    the support is impossible under `expected`: p-value 0."""
    if set(observed) - set(expected):
        return 0.0
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for key, p in expected.items():
        if p * n >= 5:
            cells.append((observed.get(key, 0), p * n))
        else:
            pooled_obs, pooled_exp = pooled_obs + observed.get(key, 0), pooled_exp + p * n
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


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
    assert _chi_square_pvalue(first, dict(enumerate(p[0].tolist())), n) > ALPHA
    assert _chi_square_pvalue(second, dict(enumerate(p[1].tolist())), sum(second.values())) > ALPHA
    # and the test has power: the draft distribution itself is rejected
    if not deterministic:
        assert _chi_square_pvalue(first, dict(enumerate(q[0].tolist())), n) < ALPHA


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


# ---------------------------------------------------------------------------------------------- adaptive controller


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


def test_forced_modes_ignore_costs():
    always = AdaptiveController(max_tokens=4, mode="always")
    never = AdaptiveController(max_tokens=4, mode="never")
    for controller in (always, never):
        for _ in range(WARMUP_STEPS + 5):
            controller.observe_step(100, 10, 10.0)
    assert always.plan(["a", "b"], [9, 2]) == [4, 2]
    assert never.plan(["a", "b"], [9, 2]) == [0, 0]


# ---------------------------------------------------------------------------------------------- engine: tiny model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-spec")
    write_tiny_llama(folder, load_checkpoint().tokenizer, seed=3, vocab_size=VOCAB)
    return folder


@pytest.fixture(scope="module")
def plain(tiny_dir) -> LLM:
    return LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24)


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(2, 70))] for _ in range(count)]


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


def _check_pools(engine: LLMEngine) -> None:
    """Ref counts equal the table entries holding each block, free exactly when unreferenced; each running
    request holds blocks for its computed tokens only (rejected drafts rolled back); published blocks hash
    the request's final tokens."""
    managers = [engine.kv_manager]
    proposer = engine.speculator.proposer if engine.speculator else None
    if hasattr(proposer, "kv"):
        managers.append(proposer.kv)
    for kv in managers:
        pool = kv.pool
        refs = Counter(b for tables in kv.block_tables.values() for t in tables for b in t if b != NULL_BLOCK)
        assert [b.ref_count for b in pool.blocks] == [refs[i] for i in range(pool.num_blocks)]
        assert set(pool.free_queue) == {i for i in range(pool.num_blocks) if not refs[i]}
    kv = engine.kv_manager
    for request in engine.scheduler.running:
        table = kv.block_tables[request.request_id][0]
        assert len(table) == kv.blocks_needed(request.num_computed_tokens)
        hashes: list[bytes] = []
        extend_block_hashes(hashes, request.token_ids[:request.num_computed_tokens], kv.block_size)
        for i in range(kv.num_cached_blocks.get(request.request_id, 0)):
            assert kv.pool.blocks[table[i]].block_hash in (None, hashes[i])


def _all_free(engine: LLMEngine) -> None:
    _check_pools(engine)
    for kv in [engine.kv_manager] + ([engine.speculator.proposer.kv] if hasattr(engine.speculator.proposer, "kv") else []):
        assert kv.pool.num_free == kv.pool.num_blocks and not kv.block_tables


@pytest.fixture(scope="module")
def greedy_case(plain):
    prompts = _prompts(24, seed=1)
    params = _greedy_mix(plain, prompts)
    return prompts, params, _run_batch(plain, prompts, params)


@pytest.mark.parametrize("spec", [
    {**NGRAM, "mode": "always"},
    NGRAM,
    {"method": "draft_model", "num_speculative_tokens": 4, "mode": "always"},  # the target itself: all accepted
    {"method": "draft_model", "num_speculative_tokens": 3, "num_layers": 1},
    {"method": "draft_model", "num_speculative_tokens": 3, "quantization": "int8", "mode": "always"},
], ids=["ngram-always", "ngram-auto", "draft-self", "draft-1-layer", "draft-int8"])
def test_greedy_outputs_identical_with_speculation(tiny_dir, greedy_case, spec):
    prompts, params, expected = greedy_case
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24, speculative_config=spec)
    got = _run_batch(llm, prompts, params)
    _assert_same_outputs(got, expected)
    stats = llm.engine.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens > 0
    assert sum(stats.spec_accepted_per_pos) == stats.spec_num_accepted_tokens
    assert list(stats.spec_accepted_per_pos) == sorted(stats.spec_accepted_per_pos, reverse=True)
    if spec.get("model") is None and spec["method"] == "draft_model" and "num_layers" not in spec \
            and "quantization" not in spec:
        assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
    _all_free(llm.engine)


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

    def retain(self, request_ids):
        pass


def _oracle_engine(llm: LLM, references, cache: CacheConfig, seed: int) -> LLMEngine:
    engine = LLMEngine(llm.model, llm.tokenizer, llm.dtype, cache,
                       SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=96),
                       SpeculativeConfig("ngram", 5, mode="always"))
    engine.speculator = Speculator(engine.speculator.config, NoisyOracle(references, 0.3, seed))
    return engine


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_rollbacks_preemption_and_aborts_keep_tokens_and_pools_right(plain, prefix_caching):
    """Requests sharing prefixes, a cache too small for all of them (preemptions), random aborts: greedy tokens
    equal the plain engine's, pool invariants hold after every step, and every block is free at the end."""
    rng = random.Random(4)
    shared = _prompts(3, seed=7)
    prompts = [shared[i % 3] * 2 + _prompts(1, seed=100 + i)[0][:rng.randrange(1, 20)] for i in range(14)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts], params)]
    references = {tuple(p): e for p, e in zip(prompts, expected)}
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4  # K and V, 2 layers, 16 slots, 2 KV heads of 32 floats
    engine = _oracle_engine(plain, references, CacheConfig(16, 24 * block_bytes, prefix_caching), seed=5)
    done, aborted = {}, set()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        _check_pools(engine)
        steps += 1
        if steps % 9 == 0 and len(aborted) < 3:
            victim = next((r.request_id for r in reversed(engine.scheduler.running)), None)
            if victim is not None:
                engine.abort(victim)
                aborted.add(victim)
                _check_pools(engine)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and aborted
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert stats.spec_accepted_per_pos[4] > 0  # whole drafts were accepted, too
    for i in range(len(prompts)):
        if str(i) not in aborted:
            assert done[str(i)] == expected[i], f"request {i}"
    if prefix_caching:
        assert stats.prefix_cache_hits > 0
    _all_free(engine)


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
    prompts = _prompts(8, seed=21)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in gemma.generate([{"prompt_token_ids": p} for p in prompts], params)]
    engine = _oracle_engine(gemma, {tuple(p): e for p, e in zip(prompts, expected)}, CacheConfig(4, 2**22), seed=6)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        _check_pools(engine)
    assert [done[str(i)] for i in range(len(prompts))] == expected
    assert 0 < engine.stats().spec_num_accepted_tokens < engine.stats().spec_num_draft_tokens
    _all_free(engine)


def test_draft_model_pool_is_freed_after_aborts_and_preemption(tiny_dir, plain):
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=20 * 2 * 2 * 16 * 2 * 32 * 4,
              max_num_batched_tokens=64, speculative_config={"method": "draft_model", "num_speculative_tokens": 3,
                                                            "num_layers": 1, "mode": "always"})
    engine = llm.engine
    prompts = _prompts(10, seed=9)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.7, seed=i, max_tokens=30, ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        _check_pools(engine)
        steps += 1
        if steps == 6:
            engine.abort("3")
    assert engine.stats().num_preemptions > 0
    _all_free(engine)


def test_seeded_sampling_under_speculation_is_reproducible(tiny_dir):
    spec = {"method": "draft_model", "num_speculative_tokens": 3, "num_layers": 1, "mode": "always"}
    runs = []
    for _ in range(2):
        llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**22, speculative_config=spec)
        outs = llm.generate([{"prompt_token_ids": p} for p in _prompts(6, seed=3)],
                            [SamplingParams(temperature=1.0, top_k=20, seed=i, max_tokens=12) for i in range(6)])
        runs.append([o.outputs[0].token_ids for o in outs])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------- distribution


SAMPLED = {"temperature": 0.5, "top_k": 3, "max_tokens": 4, "ignore_eos": True}
NUM_SAMPLES = 1500


@pytest.fixture(scope="module")
def loop_prompt(plain) -> list[int]:
    """A prompt ending inside a greedy loop of the tiny model (a token repeating), the one whose next token is
    most certain, so n-gram drafts are often, but not always, accepted under sampling."""
    candidates = []
    for prompt in _prompts(32, seed=11):
        out = plain.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=40,
                                                                          ignore_eos=True))[0].outputs[0].token_ids
        for i in range(len(out) - 3):
            if out[i] == out[i + 1] == out[i + 2] == out[i + 3]:
                candidates.append(prompt + out[:i + 3])
                break
    assert candidates, "no greedy loop found"
    return max(candidates, key=lambda p: float(plain.engine.runner.score(p)[-1].softmax(-1).max()))


def _exact_joint(llm: LLM, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    """P(first `length` output tokens) under SAMPLED, from the target's own logits, context by context."""
    params = SamplingParams(**SAMPLED)
    joint = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, prob in joint.items():
            logits = llm.engine.runner.score(prompt + list(prefix))[-1]
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
    assert _chi_square_pvalue(observed, expected_joint, NUM_SAMPLES) > ALPHA
    _all_free(llm.engine)


def test_distribution_test_catches_a_biased_verifier(tiny_dir, loop_prompt, expected_joint, monkeypatch):
    """Accepting every draft token (no min(1, p/q) test) skews the distribution, and the test sees it."""
    monkeypatch.setattr(speculator_module, "rejection_sample",
                        lambda p, drafts, q, g: list(drafts) + [int(torch.multinomial(p[len(drafts)], 1, generator=g))])
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24, speculative_config={**NGRAM, "mode": "always"})
    observed = _sampled_joint(llm, loop_prompt, 3)
    assert _chi_square_pvalue(observed, expected_joint, NUM_SAMPLES) < ALPHA


# ---------------------------------------------------------------------------------------------- metrics, CLI


def test_metrics_endpoint_exports_vllm_named_spec_counters():
    from types import SimpleNamespace

    from tokenmill.engine.scheduler import SchedulerStats
    from tokenmill.server.metrics import ServerMetrics, render_metrics

    stats = SchedulerStats(1, 0, 2, 10, 0.5, 0, 0, 0, 7, spec_num_drafts=4, spec_num_draft_tokens=12,
                           spec_num_accepted_tokens=7, spec_accepted_per_pos=(4, 2, 1))
    assert SchedulerStats(*vars(stats).values()) == stats  # the engine core process sends the fields as a tuple
    text = render_metrics([ServerMetrics(SimpleNamespace(stats=stats), "m")]).decode()
    for line in ('tokenmill:spec_decode_num_drafts_total{model_name="m"} 4.0',
                 'tokenmill:spec_decode_num_draft_tokens_total{model_name="m"} 12.0',
                 'tokenmill:spec_decode_num_accepted_tokens_total{model_name="m"} 7.0',
                 'tokenmill:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"} 1.0'):
        assert line in text
    plain = render_metrics([ServerMetrics(SimpleNamespace(stats=SchedulerStats(0, 0, 0, 10, 0.0, 0, 0, 0, 0)), "m")])
    assert b"spec_decode" not in plain  # not configured: not exported (as vLLM)


def test_bench_latency_prints_speculation_numbers(tmp_path, capsys):
    from tokenmill.cli import main

    write_tiny_llama(tmp_path, load_checkpoint().tokenizer, seed=3)  # the full vocabulary: real-text prompts
    assert main(["bench", "latency", "--model", str(tmp_path), "--dtype", "float32", "--input-len", "24",
                 "--output-len", "12", "--num-iters", "1", "--num-iters-warmup", "0", "--kv-cache-memory", "4000000",
                 "--speculative-config", '{"method": "draft_model", "num_speculative_tokens": 2, "mode": "always"}'
                 ]) in (0, None)
    out = capsys.readouterr().out
    assert "Speculative Decoding" in out and "Mean acceptance length:" in out
    assert "Draft acceptance rate:                   1.00" in out  # the target drafting for itself


# ---------------------------------------------------------------------------------------------- real model


REWRITE = ("Rewrite the following text, keeping its wording:\n\nThe history of computing is a story of abstraction "
           "layered on abstraction. Early machines were programmed by rewiring panels; then came stored programs, "
           "assemblers, compilers and operating systems. Each layer hid the one below it.")


@pytest.mark.slow
@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    {"method": "draft_model", "num_speculative_tokens": 3, "num_layers": 10, "mode": "always"},
], ids=["ngram", "draft-10-layers"])
def test_default_model_greedy_identical_with_speculation(llm_f32, spec):
    """The real default model (float32), input-grounded and open prompts batched: the same greedy tokens."""
    from tokenmill.spec_decode.draft_model import load_draft_model

    config = SpeculativeConfig.parse(spec)
    draft, draft_dtype = (load_draft_model(config, None, llm_f32.dtype, llm_f32.config.vocab_size)
                          if config.method == "draft_model" else (None, None))
    engine = LLMEngine(llm_f32.model, llm_f32.tokenizer, llm_f32.dtype, CacheConfig(), SchedulerConfig(),
                       config, draft, draft_dtype)
    prompts = [llm_f32.tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                                     tokenize=True)
               for c in (REWRITE, "Write a haiku about the sea.", REWRITE.replace("Rewrite", "Summarize"))]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm_f32.generate([{"prompt_token_ids": p} for p in prompts], params)]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert [done[str(i)] for i in range(3)] == expected
    assert engine.stats().spec_num_accepted_tokens > 0
    _all_free(engine)
