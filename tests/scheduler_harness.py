"""Harness for the model-free scheduler tests (test_scheduler.py, test_scheduler_random.py; as vLLM's
tests/v1/core/test_scheduler.py): Requests built by hand, a fake model that appends made-up tokens to the chunks that
sample, and invariants checked after every schedule() and update(): the token budget and max_num_seqs hold, decode
and verify chunks come first, the StepBatch matches the chunks, and every KV block is free or held by exactly the
tables that reference it (no leak once everything finished).

No model, no tokenizer, no forward pass: this module must stay fast and must not import tokenmill.model.llama.
"""
from __future__ import annotations

from collections.abc import Callable

from tokenmill.cache.kv_cache_manager import NULL_BLOCK, KVCacheManager
from tokenmill.cache.prefix_cache import extend_block_hashes
from tokenmill.config import SchedulerConfig
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from tokenmill.model.sampler import SampledToken
from tokenmill.sampling_params import SamplingParams

BLOCK = 4


class _FakeTokenizer:
    """All IncrementalDetokenizer calls: decode to nothing, so no stop string ever matches."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def make_request(rid: str, prompt: list[int], max_tokens: int = 8, priority: int = 0, arrival: float = 0.0,
                 stop_token_ids: set[int] | None = None) -> Request:
    return Request(rid, list(prompt), SamplingParams(), max_tokens, set(stop_token_ids or ()),
                   IncrementalDetokenizer(_FakeTokenizer(), prompt), priority=priority, arrival_time=arrival)


def make_scheduler(num_blocks: int = 64, budget: int = 32, max_seqs: int = 8, prefix: bool = True,
                   windows: tuple[int | None, ...] = (None,)) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK, prefix, windows)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv)


def blocks_needed(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK)


def fake_token(request: Request) -> int:
    """The 'model's' next token: deterministic per request and position."""
    return 1000 + (request.num_tokens * 31 + sum(map(ord, request.request_id))) % 997


# ---------------------------------------------------------------------------------------------------- invariants

def check_pool(s: Scheduler) -> None:
    """Each block's ref count is the number of tables holding it; it is free exactly when none does; the hash map
    agrees with the blocks."""
    pool = s.kv.pool
    refs = [0] * pool.num_blocks
    for tables in s.kv.block_tables.values():
        held = [b for table in tables for b in table if b != NULL_BLOCK]
        assert len(held) == len(set(held)), "a request holds the same block twice"
        for b in held:
            refs[b] += 1
    assert [b.ref_count for b in pool.blocks] == refs
    assert set(pool.free_queue) == {i for i, r in enumerate(refs) if r == 0}
    for block_hash, block_id in pool.cached.items():
        assert pool.blocks[block_id].block_hash == block_hash
    assert sum(b.block_hash is not None for b in pool.blocks) == len(pool.cached)


def check_tables(s: Scheduler) -> None:
    """Only running requests hold blocks. A block two requests share is full, computed and published; a block past
    the computed full blocks is private and unpublished; published hashes are those of the final tokens."""
    by_id = {r.request_id: r for r in s.running}
    assert set(s.kv.block_tables) == set(by_id)
    for rid, tables in s.kv.block_tables.items():
        request = by_id[rid]
        full = request.num_computed_tokens // BLOCK
        expected: list[bytes] = []
        extend_block_hashes(expected, request.token_ids[:full * BLOCK], BLOCK)
        for g, table in enumerate(tables):
            assert NULL_BLOCK not in table[table.count(NULL_BLOCK):], "freed window blocks must form a prefix"
            for i, b in enumerate(table):
                if b == NULL_BLOCK:
                    continue
                block = s.kv.pool.blocks[b]
                if block.ref_count > 1:
                    assert i < full and block.block_hash is not None, "a shared block must be full and published"
                if i >= full:
                    assert block.block_hash is None, "a block with uncomputed (or rejected draft) slots is published"
                elif block.block_hash is not None and s.kv.enable_prefix_caching:
                    assert block.block_hash[:len(expected[i])] == expected[i]  # group g salts the chain hash
                    assert (g == 0) == (block.block_hash == expected[i])


def check_schedule(s: Scheduler, out: SchedulerOutput, running_before: list[Request]) -> None:
    cfg = s.config
    assert all(c.num_tokens >= 1 for c in out.chunks)
    assert out.num_tokens <= cfg.max_num_batched_tokens
    assert out.batch.num_tokens == out.num_tokens
    assert len(s.running) <= cfg.max_num_seqs
    assert s.running == sorted(s.running, key=Request.sort_key)
    assert s.waiting == sorted(s.waiting, key=Request.sort_key)
    ids = [c.request.request_id for c in out.chunks]
    assert len(ids) == len(set(ids))
    assert all(c.request in s.running and c.request.status is RequestStatus.RUNNING for c in out.chunks)
    # every running request gets a chunk unless the budget ran out
    if any(r.request_id not in ids for r in s.running):
        assert out.num_tokens == cfg.max_num_batched_tokens
    # preemption: victims come from the tail of `running` (lowest priority, latest arrival) and start over
    for victim in out.preempted:
        assert victim in running_before and victim not in s.running and victim in s.waiting
        assert victim.status is RequestStatus.WAITING and victim.num_computed_tokens == 0
        assert victim.request_id not in ids and victim.request_id not in s.kv.block_tables
        assert all(r.sort_key() < victim.sort_key() for r in s.running)
    if out.preempted:  # in a step that preempted, only requests more urgent than every victim are admitted
        urgency = min(v.priority for v in out.preempted)
        assert all(r.priority < urgency for r in s.running if r not in running_before)
    # decode and verify chunks first, then prompt chunks
    decode_like = [c.num_tokens == 1 or bool(c.draft_token_ids) for c in out.chunks]
    assert decode_like == sorted(decode_like, reverse=True)
    # the StepBatch is the chunks, flattened
    batch = out.batch
    assert len(batch.chunks) == len(out.chunks)
    positions: list[int] = []
    token_ids: list[int] = []
    rows: list[int] = []
    first_rows: list[int | None] = []
    for chunk, bc in zip(out.chunks, batch.chunks):
        request, n, drafts = chunk.request, chunk.num_tokens, chunk.draft_token_ids
        start, d = request.num_computed_tokens, len(drafts)
        if drafts:
            assert start == request.num_tokens - 1 and n == d + 1  # a verify chunk: the last token, then drafts
            assert drafts == request.draft_token_ids[:d]
        assert start + n - d <= request.num_tokens
        expected_ids = request.token_ids[start:start + n - d] + drafts
        samples = start + n - d == request.num_tokens
        assert (bc.token_ids, bc.start, bc.num_drafts, bc.samples) == (expected_ids, start, d, samples)
        assert bc.is_decode == (n == 1 or d > 0)
        assert bc.block_tables is s.kv.block_tables[request.request_id]
        for table, window in zip(bc.block_tables, s.kv.windows):
            assert len(table) >= blocks_needed(start + n)  # room for every token computed this step
            first_key = 0 if window is None else max(0, start - window + 1)  # the first query's first key
            assert NULL_BLOCK not in table[first_key // BLOCK:blocks_needed(start + n)]
            if window is not None:  # a sliding group holds the window plus the chunk, not the whole sequence
                held = sum(b != NULL_BLOCK for b in table)
                assert held <= (n + window - 3) // BLOCK + 2
        if samples:
            first_rows.append(len(rows))
            rows += range(len(positions) + n - 1 - d, len(positions) + n)
        else:
            first_rows.append(None)
        positions += range(start, start + n)
        token_ids += expected_ids
    assert (batch.positions, batch.token_ids) == (positions, token_ids)
    assert (batch.logits_rows, batch.first_logit_row) == (rows, first_rows)
    check_pool(s)
    assert set(s.kv.block_tables) == {r.request_id for r in s.running}


def check_between_steps(s: Scheduler) -> None:
    check_pool(s)
    check_tables(s)
    stats = s.stats()
    assert (stats.num_running, stats.num_waiting) == (len(s.running), len(s.waiting))
    assert (stats.kv_blocks_used, stats.kv_blocks_total) == (s.kv.num_used_blocks(), s.kv.pool.num_blocks)
    assert 0.0 <= stats.kv_utilization <= 1.0 and 0 <= stats.prefix_cache_hits <= stats.prefix_cache_queries
    assert len(s.running) <= s.config.max_num_seqs
    for request in s.running:
        assert request.status is RequestStatus.RUNNING and not request.finished
        assert 0 <= request.num_computed_tokens < request.num_tokens  # always a token left to compute
        for table, window in zip(s.kv.block_tables[request.request_id], s.kv.windows):
            # exactly the computed tokens' blocks: nothing left over from rejected drafts or over-allocation
            assert len(table) == blocks_needed(request.num_computed_tokens)
            if window is not None:  # between steps: what the next query's window spans
                assert sum(b != NULL_BLOCK for b in table) <= (window - 2) // BLOCK + 2
    for request in s.waiting:
        assert request.status is RequestStatus.WAITING and not request.finished
        assert request.num_computed_tokens == 0 and request.request_id not in s.kv.block_tables


def check_no_leak(s: Scheduler) -> None:
    assert not s.has_unfinished()
    assert s.kv.num_used_blocks() == 0 and s.kv.pool.num_free == s.kv.pool.num_blocks
    assert s.kv.block_tables == {} and s.kv.num_cached_blocks == {}
    check_pool(s)


# ---------------------------------------------------------------------------------------------------- fake engine

def run_model(out: SchedulerOutput, accept: Callable[[ScheduledChunk], int] | None = None) -> None:
    """What LLMEngine.step does with the logits, minus the model: each sampling chunk records one token, or for a
    verify chunk its first k drafts plus one (stopping early when the request finishes)."""
    for chunk, row in zip(out.chunks, out.batch.first_logit_row):
        if row is None:
            continue
        request, drafts = chunk.request, chunk.draft_token_ids
        k = accept(chunk) if drafts and accept is not None else 0
        assert 0 <= k <= len(drafts)
        emitted = 0
        for token in drafts[:k] + [None]:
            request.record(SampledToken(fake_token(request) if token is None else token, 0.0, 1, []), lambda t: "")
            emitted += 1
            if request.finished:
                break
        chunk.num_accepted = max(emitted - 1, 0) if drafts else 0


def step(s: Scheduler, drafts: dict[str, list[int]] | None = None,
         accept: Callable[[ScheduledChunk], int] | None = None) -> SchedulerOutput:
    """One engine step with every invariant checked: drafts are set on the running requests as the speculator does
    (all others get none), then schedule, fake model, update."""
    for request in s.running:
        request.draft_token_ids = list((drafts or {}).get(request.request_id, []))
    running_before = list(s.running)
    out = s.schedule()
    check_schedule(s, out, running_before)
    run_model(out, accept)
    s.update(out)
    check_between_steps(s)
    return out


def drain(s: Scheduler, max_steps: int = 1000) -> int:
    for steps in range(max_steps):
        if not s.has_unfinished():
            return steps
        step(s)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def chunk_of(out: SchedulerOutput, request: Request) -> ScheduledChunk | None:
    return next((c for c in out.chunks if c.request is request), None)
