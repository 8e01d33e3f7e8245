"""Shared by the speculative-decoding tests: constants, the chi-square test, prompts and KV pool invariants.

Distribution tests are chi-square goodness-of-fit tests at significance level ALPHA against the exact target
distribution; every run is seeded, so they are deterministic.
"""
from __future__ import annotations

import random
from collections import Counter

import torch

from tokenmill.cache.kv_cache_manager import NULL_BLOCK
from tokenmill.cache.prefix_cache import extend_block_hashes
from tokenmill.engine.engine import LLMEngine

ALPHA = 0.001
VOCAB = 512  # the tiny random Llama's vocabulary (conftest.py); prompts are token ids
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def chi_square_pvalue(observed: Counter, expected: dict, n: int) -> float:
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


def random_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(2, 70))] for _ in range(count)]


def check_pools(engine: LLMEngine) -> None:
    """Ref counts equal the table entries holding each block, free exactly when unreferenced; each running
    request holds blocks for its computed tokens only (rejected drafts rolled back); published blocks hash
    the request's final tokens."""
    for kv in _managers(engine):
        pool = kv.pool
        refs = Counter(b for tables in kv.block_tables.values() for t in tables for b in t if b != NULL_BLOCK)
        if kv.recent is not None:  # blocks that pay for recent rows' twins (cache/recent_rows.py)
            refs.update(b for owned in kv.recent.owned.values() for _, paid in owned.values() for b in paid)
            for request_id, owned in kv.recent.owned.items():
                assert all(kv.recent.twin_of[block] >= 0 for block in owned)
                assert set(owned) <= set(kv.block_tables[request_id][0])
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


def _managers(engine: LLMEngine) -> list:
    """The target's KV cache manager and any a proposer keeps (a draft model's)."""
    proposers = engine.speculator.proposers.values() if engine.speculator else ()
    return [engine.kv_manager] + [p.kv for p in proposers if hasattr(p, "kv")]


def all_free(engine: LLMEngine) -> None:
    check_pools(engine)
    for kv in _managers(engine):
        assert kv.pool.num_free == kv.pool.num_blocks and not kv.block_tables
        assert kv.recent is None or not any(kv.recent.owned.values())
