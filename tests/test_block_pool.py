"""Block pool and KV manager invariants under random allocate / share / free / evict sequences (hypothesis)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.cache.block_pool import BlockPool
from tokenmill.cache.kv_cache_manager import NULL_BLOCK, KVCacheManager
from tokenmill.cache.prefix_cache import extend_block_hashes, hash_block
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams


class _NoTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(), 100, set(), IncrementalDetokenizer(_NoTokenizer(), tokens))


def _check_pool(pool: BlockPool, owners: dict[str, list[list[int]]]) -> None:
    refs = [0] * pool.num_blocks
    for tables in owners.values():
        for b in (b for table in tables for b in table if b != NULL_BLOCK):
            refs[b] += 1
    assert [b.ref_count for b in pool.blocks] == refs  # ref counts equal the tables holding each block
    assert set(pool.free_queue) == {i for i, r in enumerate(refs) if r == 0}  # free exactly when unreferenced
    for block_hash, block_id in pool.cached.items():  # the hash map and the blocks agree
        assert pool.blocks[block_id].block_hash == block_hash
    assert sum(b.block_hash is not None for b in pool.blocks) == len(pool.cached)


def test_hash_chain_depends_on_every_earlier_token():
    a, b = [], []
    extend_block_hashes(a, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    extend_block_hashes(b, [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second block, different parent
    assert hash_block(b"p", [1, 2]) != hash_block(b"p", [1, 2], b"lora-1")
    partial: list[bytes] = []
    extend_block_hashes(partial, [1, 2, 3, 4, 5], 4)
    assert partial == a[:1]  # partial blocks are never hashed


def test_lru_eviction_order():
    pool = BlockPool(3)
    ids = pool.allocate(3)
    for i, block_id in enumerate(ids):
        pool.mark_cached(block_id, bytes([i]))
    pool.free([ids[2], ids[0], ids[1]])
    assert pool.lookup(bytes([1])) == ids[1]
    pool.allocate(1)  # evicts the least recently freed: ids[2]
    assert pool.lookup(bytes([2])) is None and pool.lookup(bytes([0])) == ids[0]
    pool.share(ids[0])  # a cached free block is revived, not evicted
    assert ids[0] not in pool.free_queue


ops = st.lists(
    st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 7), st.integers(1, 40), st.integers(0, 3)),
    min_size=1, max_size=60,
)


WINDOW = 6  # with block_size 4, a sliding group spans at most (chunk + WINDOW - 3) // 4 + 2 blocks in a step


@pytest.mark.parametrize("windows", [(None,), (None, WINDOW, WINDOW)], ids=["full", "full+2sliding"])
@settings(max_examples=150, deadline=None)
@given(operations=ops)
def test_manager_invariants_under_random_operations(windows, operations):
    """Requests with shared prefixes (from a few token families) come and go; invariants hold after each op
    and every block is free at the end. With sliding groups, each also holds a bounded number of blocks."""
    manager = KVCacheManager(num_blocks=48, block_size=4, enable_prefix_caching=True, windows=windows)
    live: dict[str, Request] = {}
    for op, slot, length, family in operations:
        rid = f"r{slot}"
        if op == "add" and rid not in live:
            request = _request(rid, [family * 1000 + i for i in range(length)])
            request.num_computed_tokens = manager.lookup_prefix(request)
            assert request.num_computed_tokens < request.num_tokens
            hits = manager.block_tables[rid]
            assert len({len(t) for t in hits}) == 1  # every group hit the same blocks of the prefix
            for i, block_id in enumerate(hits[0]):  # a hit is exactly the block published for that prefix
                assert manager.pool.blocks[block_id].block_hash == request.block_hashes[i]
            if manager.allocate(request, request.num_tokens - request.num_computed_tokens):
                request.num_computed_tokens = request.num_tokens
                manager.commit(request)
                live[rid] = request
            else:
                manager.free(request)
        elif op == "grow" and rid in live:
            request = live[rid]
            request.token_ids.extend(range(7000, 7000 + length % 6))
            if manager.allocate(request, request.num_tokens - request.num_computed_tokens):
                request.num_computed_tokens = request.num_tokens
                manager.commit(request)
        elif op == "free" and rid in live:
            manager.free(live.pop(rid))
        _check_pool(manager.pool, manager.block_tables)
        shared_written = [
            (rid, i) for rid, tables in manager.block_tables.items() for table in tables for i, b in enumerate(table)
            if b != NULL_BLOCK and manager.pool.blocks[b].ref_count > 1 and i >= live[rid].num_computed_tokens // 4
        ]
        assert not shared_written  # a block held by two requests is always a full, computed one
        for live_id in live:  # between steps, a sliding group holds what the next query's window spans
            for held, window in zip(manager.held_blocks(live_id), windows):
                assert window is None or held <= (window - 2) // 4 + 2
    for request in live.values():
        manager.free(request)
    assert manager.pool.num_free == manager.pool.num_blocks
    _check_pool(manager.pool, {})


def test_sliding_group_frees_blocks_out_of_the_window_and_keeps_them_cached():
    """One request decodes 100 tokens: its full group grows, its sliding group keeps <= 3 blocks (window 6,
    block 4), and a later request with the same 60-token prefix still hits it (freed blocks stay cached)."""
    manager = KVCacheManager(num_blocks=64, block_size=4, enable_prefix_caching=True, windows=(None, WINDOW))
    request = _request("a", list(range(10)))
    assert manager.allocate(request, 10)
    request.num_computed_tokens = 10
    manager.commit(request)
    for token in range(100):
        request.token_ids.append(1000 + token)
        assert manager.allocate(request, 1)
        full, sliding = manager.held_blocks("a")
        assert full == -(-request.num_tokens // 4) and sliding <= 3
        request.num_computed_tokens += 1
        manager.commit(request)
        assert manager.held_blocks("a")[1] <= 2  # keys num_tokens - 5 .. num_tokens - 1 for the next query
    assert manager.num_used_blocks() <= -(-110 // 4) + 3
    manager.free(request)
    again = _request("b", request.token_ids[:60] + [5])
    again.num_computed_tokens = manager.lookup_prefix(again)
    assert again.num_computed_tokens == 60
    assert manager.allocate(again, 1) and manager.held_blocks("b") == [16, 3]  # keys 55..60: blocks 13..15


def test_capacity_counts_every_group():
    """The longest request that fits alone: a full group holds every block, a sliding one the window + chunk."""
    full = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    assert full.max_request_tokens(max_chunk=8, limit=1000) == 40
    hybrid = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False, windows=(None, WINDOW))
    assert hybrid.max_request_tokens(max_chunk=1, limit=1000) == 28  # 7 full blocks + 3 sliding
    assert hybrid.max_request_tokens(max_chunk=8, limit=1000) == 24  # 6 + 4
    sliding = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False, windows=(WINDOW,))
    assert sliding.max_request_tokens(max_chunk=8, limit=1000) == 1000  # bounded: only the limit applies
