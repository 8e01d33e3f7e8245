"""Randomized model-free scheduler workloads: random arrivals, prefixes, priorities, stop tokens, aborts and draft
acceptances on small overloaded pools, every step checked by scheduler_harness's invariants.

No model, no tokenizer, no forward pass: this file must stay fast and must not import tokenmill.model.llama.
"""
from __future__ import annotations

import random

import pytest

from scheduler_harness import check_between_steps, check_no_leak, make_request, make_scheduler, step
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import ScheduledChunk


def run_random_workload(seed: int, windows: tuple[int | None, ...], num_blocks: int, budget: int, max_seqs: int,
                        num_steps: int = 200) -> dict[str, int]:
    """Random arrivals (sharing prefixes from a few families), lengths, priorities, stop tokens, aborts and draft
    acceptances for `num_steps` steps, then a drain; every step is checked (see step()). Returns what it exercised."""
    rng = random.Random(seed)
    s = make_scheduler(num_blocks=num_blocks, budget=budget, max_seqs=max_seqs, windows=windows)
    limit = s.kv.max_request_tokens(budget, 10**6)  # as LLMEngine caps requests: each one fits alone
    families = [[f * 1000 + i for i in range(40)] for f in range(1, 4)]
    live: list[Request] = []
    done: list[Request] = []
    counts = {"preempted": 0, "verify": 0, "rejected": 0, "prefill_chunks": 0}
    scheduled_tokens = 0

    def accept(chunk: ScheduledChunk) -> int:
        counts["verify"] += 1
        k = rng.choice([0, len(chunk.draft_token_ids), rng.randint(0, len(chunk.draft_token_ids))])
        counts["rejected"] += k < len(chunk.draft_token_ids)
        return k

    for t in range(num_steps):
        if rng.random() < 0.35:
            prompt = families[rng.randrange(3)][:rng.randrange(0, 41)]
            prompt = (prompt + [rng.randrange(1, 999) for _ in range(rng.randint(1, 30))])[:limit - 1]
            max_tokens = min(rng.randint(1, 40), limit - len(prompt))
            stop = {1000 + rng.randrange(997) for _ in range(rng.randint(0, 20))}
            request = make_request(f"r{t}", prompt, max_tokens, priority=rng.randint(0, 2), arrival=float(t),
                                   stop_token_ids=stop)
            s.add(request)
            live.append(request)
        if live and rng.random() < 0.04:
            victim = live.pop(rng.randrange(len(live)))
            victim.finish(float(t), "abort")
            s.finish(victim)
            done.append(victim)
            check_between_steps(s)
        drafts = {}
        for request in s.running:  # as the speculator: only decoding requests, never past max_tokens
            room = request.max_tokens - len(request.output_ids) - 1
            if request.num_tokens - request.num_computed_tokens == 1 and room > 0 and rng.random() < 0.5:
                drafts[request.request_id] = [rng.randrange(1, 999) for _ in range(rng.randint(1, min(room, 5)))]
        out = step(s, drafts, accept)
        scheduled_tokens += out.num_tokens
        counts["preempted"] += len(out.preempted)
        counts["prefill_chunks"] += sum(c.num_tokens > 1 and not c.draft_token_ids for c in out.chunks)
        done += [r for r in live if r.finished]
        live = [r for r in live if not r.finished]
    for _ in range(5000):
        if not s.has_unfinished():
            break
        out = step(s)
        scheduled_tokens += out.num_tokens
        counts["preempted"] += len(out.preempted)
    assert not s.has_unfinished()
    for request in live + done:
        assert request.finished
        if request.finish_reason == "length":
            assert len(request.output_ids) == request.max_tokens
        elif request.finish_reason == "stop":
            assert request.output_ids[-1] in request.stop_token_ids and len(request.output_ids) <= request.max_tokens
    check_no_leak(s)
    assert s.num_preemptions == counts["preempted"] and s.num_computed_tokens == scheduled_tokens
    counts["prefix_hits"] = s.kv.prefix_stats.hits
    return counts


@pytest.mark.parametrize("windows", [(None,), (None, 32)], ids=["full", "full+sliding"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_keeps_every_invariant(seed, windows):
    """~200 steps of an overloaded small pool: invariants every step, nothing leaks, and the run exercised
    preemption, prefix hits, chunked prefill and accepted and rejected drafts."""
    rng = random.Random(seed)
    counts = run_random_workload(seed, windows, num_blocks=40, budget=rng.choice([8, 16, 24, 32]),
                                 max_seqs=rng.choice([3, 4, 6]))
    assert all(counts.values()), counts


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_at_the_limits(seed):
    """Tiny budgets (drafts cut to nothing at 1), one seat, and pools barely larger than one request."""
    rng = random.Random(100 + seed)
    windows = [(None,), (None, 8), (8,), (None, 32)][seed]
    run_random_workload(100 + seed, windows, num_blocks=rng.choice([12, 16, 24]), budget=rng.choice([1, 2, 5]),
                        max_seqs=rng.choice([1, 2]), num_steps=150)
