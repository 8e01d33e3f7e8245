"""Model-free scheduler scenario tests (as vLLM's tests/v1/core/test_scheduler.py): hand-built Requests stepped
through the scheduler with scheduler_harness's fake model, every invariant checked after each schedule() and update().
The randomized workloads are in test_scheduler_random.py.

No model, no tokenizer, no forward pass: this file must stay fast and must not import tokenmill.model.llama.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scheduler_harness import (
    BLOCK,
    blocks_needed,
    check_between_steps,
    check_no_leak,
    chunk_of,
    drain,
    make_request,
    make_scheduler,
    step,
)
from tokenmill.cache.kv_cache_manager import NULL_BLOCK
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler


def test_this_file_loads_no_model_code():
    """Importing these tests (scheduler, KV manager, request, sampler types) pulls in no model and no GGUF loader."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_scheduler; "
            "print(sorted(m for m in sys.modules if m.startswith(('tokenmill.model.llama', 'tokenmill.model.loader', "
            "'tokenmill.model.runner'))))")
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_empty_scheduler_schedules_nothing():
    s = make_scheduler()
    out = s.schedule()
    assert out.chunks == [] and out.batch.num_tokens == 0 and out.batch.logits_rows == []
    s.update(out)
    check_no_leak(s)


def test_admission_order_is_priority_then_arrival_within_max_num_seqs():
    s = make_scheduler(max_seqs=2, budget=64)
    reqs = {
        "a": make_request("a", [1, 2, 3], max_tokens=2, priority=1, arrival=0.0),
        "b": make_request("b", [4, 5, 6], max_tokens=2, priority=0, arrival=2.0),
        "c": make_request("c", [7, 8, 9], max_tokens=2, priority=0, arrival=1.0),
        "d": make_request("d", [1, 5, 9], max_tokens=2, priority=2, arrival=-1.0),
        "e": make_request("e", [2, 6, 7], max_tokens=2, priority=1, arrival=0.5),
    }
    for request in reqs.values():
        s.add(request)
    assert [r.request_id for r in s.waiting] == ["c", "b", "a", "e", "d"]
    admitted: list[list[str]] = []
    while s.has_unfinished():
        before = {r.request_id for r in s.running}
        out = step(s)
        admitted.append([c.request.request_id for c in out.chunks if c.request.request_id not in before])
        assert len(admitted) < 20
    assert [ids for ids in admitted if ids] == [["c", "b"], ["a", "e"], ["d"]]
    assert all(len(r.output_ids) == 2 and r.finish_reason == "length" for r in reqs.values())
    check_no_leak(s)


def test_chunked_prefill_of_a_long_prompt_while_decodes_keep_flowing():
    s = make_scheduler(budget=16, max_seqs=4)
    a = make_request("a", list(range(10, 15)), max_tokens=40, arrival=0.0)
    b = make_request("b", list(range(20, 25)), max_tokens=40, arrival=1.0)
    s.add(a)
    s.add(b)
    step(s)
    assert a.num_computed_tokens == 5 and len(a.output_ids) == 1
    long = make_request("long", list(range(100, 200)), max_tokens=3, arrival=2.0)
    s.add(long)
    starts = []
    while not long.output_ids:
        out = step(s)
        assert [c.request.request_id for c in out.chunks] == ["a", "b", "long"]
        assert [c.num_tokens for c in out.chunks[:2]] == [1, 1]  # the decodes are never stalled
        assert out.batch.first_logit_row[:2] == [0, 1]
        chunk = out.chunks[2]
        starts.append(out.batch.chunks[2].start)
        assert chunk.num_tokens == min(14, 100 - starts[-1])  # the rest of the budget
        assert out.num_tokens == min(16, 2 + 100 - starts[-1])
        last = starts[-1] + chunk.num_tokens == 100
        assert out.batch.first_logit_row[2] == (2 if last else None)  # only its last chunk samples
        if last:
            assert out.batch.logits_rows == [0, 1, out.num_tokens - 1]
            assert out.batch.positions[2:] == list(range(starts[-1], 100))
    assert starts == list(range(0, 100, 14))
    assert len(a.output_ids) == 1 + len(starts)
    out = step(s)
    assert [c.num_tokens for c in out.chunks] == [1, 1, 1] and out.batch.logits_rows == [0, 1, 2]
    drain(s)
    assert len(a.output_ids) == 40 and len(long.output_ids) == 3
    check_no_leak(s)


def test_prefix_cache_hits_share_full_blocks_and_are_counted():
    s = make_scheduler(budget=64)
    shared = list(range(100, 112))  # three full blocks
    a = make_request("a", shared + [1, 2], max_tokens=4)
    s.add(a)
    step(s)
    assert s.kv.num_cached_blocks["a"] == 3
    b = make_request("b", shared + [7, 8, 9], max_tokens=4)
    s.add(b)
    out = step(s)
    assert b.num_cached_prompt_tokens == 12
    chunk = chunk_of(out, b)
    assert (out.batch.chunks[out.chunks.index(chunk)].start, chunk.num_tokens) == (12, 3)
    table_a, table_b = s.kv.block_tables["a"][0], s.kv.block_tables["b"][0]
    assert table_b[:3] == table_a[:3] and table_b[3] != table_a[3]
    assert [s.kv.pool.blocks[i].ref_count for i in table_a[:3]] == [2, 2, 2]
    assert (s.kv.prefix_stats.queries, s.kv.prefix_stats.hits) == (14 + 15, 12)
    # a prompt of exactly the cached blocks recomputes its last token (its logits are needed): one block less
    c = make_request("c", shared, max_tokens=2)
    s.add(c)
    out = step(s)
    assert c.num_cached_prompt_tokens == 8 and chunk_of(out, c).num_tokens == 4
    drain(s)
    # freed blocks stay cached: a later request still hits all three
    d = make_request("d", shared + [5], max_tokens=2)
    s.add(d)
    step(s)
    assert d.num_cached_prompt_tokens == 12
    stats = s.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (14 + 15 + 12 + 13, 12 + 8 + 12)
    drain(s)
    check_no_leak(s)


def test_no_prefix_hits_when_prefix_caching_is_off():
    s = make_scheduler(prefix=False)
    for rid in "ab":
        s.add(make_request(rid, list(range(100, 113)), max_tokens=3))
        step(s)
    assert s.stats().prefix_cache_hits == 0 and not s.kv.pool.cached
    drain(s)
    check_no_leak(s)


def test_preemption_picks_lowest_priority_latest_and_the_victim_resumes():
    """6 blocks of 4 for three requests that each grow to 4 blocks: the pool runs dry while they decode."""
    s = make_scheduler(num_blocks=6, budget=32)
    a = make_request("a", [1, 2, 3, 4], max_tokens=10, priority=0, arrival=0.0)
    b = make_request("b", [5, 6, 7, 8], max_tokens=10, priority=1, arrival=1.0)  # lowest priority
    c = make_request("c", [9, 10, 11, 12], max_tokens=10, priority=0, arrival=2.0)  # latest
    for request in (a, b, c):
        s.add(request)
    victims: list[str] = []
    outputs_at_preemption: dict[str, list[int]] = {}
    for _ in range(200):
        if not s.has_unfinished():
            break
        out = step(s)
        for victim in out.preempted:
            victims.append(victim.request_id)
            outputs_at_preemption.setdefault(victim.request_id, list(victim.output_ids))
    assert victims and victims[0] == "b"  # not c, though c arrived last
    assert s.num_preemptions == len(victims) == sum(r.num_preemptions for r in (a, b, c))
    for request in (a, b, c):
        assert request.finish_reason == "length" and len(request.output_ids) == 10
    for rid, outputs in outputs_at_preemption.items():  # recomputation kept what was already generated
        assert {"a": a, "b": b, "c": c}[rid].output_ids[:len(outputs)] == outputs
    check_no_leak(s)


def test_a_request_that_is_itself_the_victim_preempts_only_itself():
    s = make_scheduler(num_blocks=3, budget=32)
    a = make_request("a", [1, 2, 3, 4], max_tokens=6, arrival=0.0)
    b = make_request("b", [5, 6, 7, 8], max_tokens=6, arrival=1.0)
    s.add(a)
    s.add(b)
    step(s)  # both prefill one block each
    out = step(s)  # a takes the last block; b needs one more and is the tail: it preempts itself
    assert [c.request for c in out.chunks] == [a] and out.preempted == [b]
    drain(s)
    assert len(a.output_ids) == len(b.output_ids) == 6 and b.num_preemptions >= 1
    check_no_leak(s)


def _decoding(s: Scheduler, prompt_len: int) -> Request:
    r = make_request("r", list(range(50, 50 + prompt_len)), max_tokens=30)
    s.add(r)
    step(s)
    assert r.num_tokens - r.num_computed_tokens == 1
    return r


def test_speculative_verify_chunk_accept_some_then_reject_all_trims_the_kv():
    s = make_scheduler(num_blocks=16, budget=32)
    r = _decoding(s, 6)  # computed 6, 7 tokens
    out = step(s, drafts={"r": [500, 501, 502]}, accept=lambda c: 2)
    bc = out.batch.chunks[0]
    assert (bc.token_ids[1:], bc.start, bc.num_drafts) == ([500, 501, 502], 6, 3)
    assert out.batch.positions == [6, 7, 8, 9] and out.batch.logits_rows == [0, 1, 2, 3]
    assert out.chunks[0].num_accepted == 2
    assert r.output_ids[1:3] == [500, 501] and r.num_tokens == 10 and r.num_computed_tokens == 9
    used = s.kv.num_used_blocks()
    assert used == 3
    # reject all five drafts, which reach into a fourth block: it is given back, the computed count stops at the
    # last final token, and only blocks of final tokens are published
    out = step(s, drafts={"r": [600, 601, 602, 603, 604]}, accept=lambda c: 0)
    assert len(out.batch.chunks[0].block_tables[0]) == 3  # the table after the trim
    assert out.chunks[0].num_accepted == 0 and 600 not in r.token_ids
    assert r.num_computed_tokens == 10 and r.num_tokens == 11
    assert s.kv.num_used_blocks() == used and s.kv.num_cached_blocks["r"] == 2
    # accept all: k drafts plus the bonus token
    out = step(s, drafts={"r": [700, 701, 702]}, accept=lambda c: 3)
    assert r.output_ids[-4:-1] == [700, 701, 702] and r.num_computed_tokens == 14 and r.num_tokens == 15
    drain(s)
    check_no_leak(s)


def test_drafts_finish_a_request_midway():
    s = make_scheduler()
    r = make_request("r", [1, 2, 3], max_tokens=3)
    s.add(r)
    step(s)
    out = step(s, drafts={"r": [7, 8, 9]}, accept=lambda c: 3)  # would emit 4, but max_tokens ends it at 3
    assert r.finish_reason == "length" and r.output_ids[1:] == [7, 8] and out.chunks[0].num_accepted == 1
    check_no_leak(s)


def test_drafts_are_cut_to_the_budget_and_dropped_rather_than_preempting():
    s = make_scheduler(budget=3)
    r = make_request("r", [1, 2], max_tokens=20)
    s.add(r)
    step(s)
    out = step(s, drafts={"r": [7, 8, 9, 10]}, accept=lambda c: 2)
    assert out.chunks[0].draft_token_ids == [7, 8] and out.num_tokens == 3
    drain(s)
    check_no_leak(s)
    # a full pool: r's drafts would need a third block, q holds the other two; r decodes plainly, nobody preempted
    s = make_scheduler(num_blocks=4)
    r = make_request("r", list(range(7)), max_tokens=9, arrival=0.0)  # 16 tokens at most: it fits alone
    q = make_request("q", list(range(10, 15)), max_tokens=2, arrival=1.0)
    s.add(r)
    s.add(q)
    step(s)
    assert s.kv.pool.num_free == 0
    out = step(s, drafts={"r": [7, 8, 9]}, accept=lambda c: 3)
    assert not out.preempted and [(c.request, c.num_tokens, c.draft_token_ids) for c in out.chunks] == [
        (r, 1, []), (q, 1, [])]
    drain(s)
    check_no_leak(s)


def test_drafts_never_cause_a_preemption():
    """5 blocks of 4: a (7 tokens) and b (8 tokens) hold two each. a's 3 drafts need the fifth block, and so does
    b's next decode: without drafts both decode; with them, b must not be the one to give way."""
    s = make_scheduler(num_blocks=5)
    a = make_request("a", list(range(7)), max_tokens=8, arrival=0.0)
    b = make_request("b", list(range(10, 18)), max_tokens=8, arrival=1.0)
    s.add(a)
    s.add(b)
    step(s)
    assert s.kv.pool.num_free == 1
    out = step(s, drafts={"a": [1, 2, 3]}, accept=lambda c: 0)
    assert not out.preempted and {c.request.request_id for c in out.chunks} == {"a", "b"}


def test_blocked_admission_gives_back_its_prefix_hit():
    """The waiting head hits two cached blocks but its remaining prompt does not fit: it gives the blocks back
    (they stay cached) and waits with nothing computed; once room frees up it is admitted with the same hit."""
    s = make_scheduler(num_blocks=6, budget=64)
    shared = list(range(100, 108))
    a = make_request("a", shared + [1], max_tokens=2, arrival=0.0)
    s.add(a)
    drain(s)
    hog = make_request("hog", list(range(200, 212)), max_tokens=3, arrival=1.0)  # 3 blocks, then a 4th
    s.add(hog)
    step(s)
    b = make_request("b", shared + list(range(12)), max_tokens=2, arrival=2.0)  # 2 cached + 3 new blocks; 1 is left
    s.add(b)
    out = step(s)
    assert chunk_of(out, b) is None and b in s.waiting and b.num_computed_tokens == 0
    assert all(s.kv.pool.blocks[i].ref_count == 0 for i in s.kv.pool.cached.values() if i not in
               s.kv.block_tables["hog"][0])
    drain(s)
    assert b.num_cached_prompt_tokens == 8 and len(b.output_ids) == 2
    assert (s.kv.prefix_stats.queries, s.kv.prefix_stats.hits) == (9 + 12 + 20, 8)
    check_no_leak(s)


def test_abort_waiting_and_running_requests_frees_everything():
    s = make_scheduler(budget=12, max_seqs=2)
    shared = list(range(100, 108))  # two full blocks
    a = make_request("a", shared + list(range(30)), max_tokens=5, arrival=0.0)
    b = make_request("b", shared + [1, 2, 3], max_tokens=5, arrival=1.0)
    w = make_request("w", [9, 9, 9], max_tokens=5, arrival=2.0)
    for request in (a, b, w):
        s.add(request)
    step(s)
    assert a.num_computed_tokens == 12 and b in s.waiting and w in s.waiting  # a is mid-prefill, the budget is spent
    w.finish(0.0, "abort")
    s.finish(w)  # waiting: it held nothing and is simply gone
    assert w not in s.waiting and s.kv.num_used_blocks() == 3
    check_between_steps(s)
    a.finish(0.0, "abort")
    s.finish(a)  # running, mid-prefill: every block goes back
    assert not s.running and s.kv.num_used_blocks() == 0
    check_between_steps(s)
    step(s)
    assert b.num_cached_prompt_tokens == 8  # the aborted request's published blocks still serve hits
    c = make_request("c", shared + [4, 5], max_tokens=5, arrival=3.0)
    s.add(c)
    step(s)
    assert c.num_cached_prompt_tokens == 8
    shared_blocks = s.kv.block_tables["b"][0][:2]
    assert s.kv.block_tables["c"][0][:2] == shared_blocks
    assert [s.kv.pool.blocks[i].ref_count for i in shared_blocks] == [2, 2]
    b.finish(0.0, "abort")
    s.finish(b)  # the blocks b shared stay with c
    assert [s.kv.pool.blocks[i].ref_count for i in shared_blocks] == [1, 1]
    assert s.kv.num_used_blocks() == len(s.kv.block_tables["c"][0])
    check_between_steps(s)
    step(s)
    c.finish(0.0, "abort")
    s.finish(c)
    check_no_leak(s)
    s.finish(c)  # finishing twice is harmless
    check_no_leak(s)
    assert not s.schedule().chunks


def test_abort_a_preempted_request():
    s = make_scheduler(num_blocks=3, budget=32)
    a = make_request("a", [1, 2, 3, 4], max_tokens=6, arrival=0.0)
    b = make_request("b", [5, 6, 7, 8], max_tokens=6, arrival=1.0)
    s.add(a)
    s.add(b)
    step(s)
    assert step(s).preempted == [b] and b in s.waiting and b.output_ids
    b.finish(0.0, "abort")
    s.finish(b)
    assert b not in s.waiting
    drain(s)
    check_no_leak(s)


def test_sliding_window_layout_keeps_a_bounded_number_of_blocks_per_request():
    s = make_scheduler(num_blocks=96, budget=16, windows=(None, 32))
    long = make_request("long", list(range(100, 200)), max_tokens=100, arrival=0.0)
    short = make_request("short", list(range(300, 310)), max_tokens=60, arrival=1.0)
    s.add(long)
    s.add(short)
    peak_sliding = 0
    while s.has_unfinished():
        out = step(s)  # within a step: window + chunk (check_schedule); between steps: the window
        if "long" in s.kv.block_tables:
            full, sliding = s.kv.held_blocks("long")
            assert full == blocks_needed(long.num_computed_tokens)
            peak_sliding = max(peak_sliding, sliding)
            table = s.kv.block_tables["long"][1]
            if long.num_computed_tokens >= 40:
                assert table[0] == NULL_BLOCK
        assert len(out.chunks) <= 2
    assert len(long.output_ids) == 100 and len(short.output_ids) == 60
    assert peak_sliding <= (32 - 2) // BLOCK + 2
    check_no_leak(s)
