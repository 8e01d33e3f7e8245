"""AsyncEngine over the engine core process, without HTTP: the delta outputs it streams must add up to exactly
the RequestOutputs the in-process engine returns, aborts must free KV blocks, and the forked core must share
the model's weights with this process instead of holding its own copy."""
from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator

import pytest

from tokenmill import SamplingParams
from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError
from tokenmill.outputs import RequestOutput

CASES = {
    "greedy+logprobs": ("The capital of France is", SamplingParams(temperature=0, max_tokens=12, logprobs=2)),
    "n=2 seeded": ("Once upon a time", SamplingParams(temperature=0.8, max_tokens=12, n=2, seed=7)),
    "stop string": ("Count: one, two, three,", SamplingParams(temperature=0, max_tokens=40, stop=[" five"])),
}


@pytest.fixture
def async_engine(llm_f32) -> Iterator[AsyncEngine]:
    engine = AsyncEngine.of_engine(llm_f32.engine)
    yield engine
    engine.shutdown()


async def _collect(engine: AsyncEngine, request_id: str, prompt: str, params: SamplingParams) -> list[RequestOutput]:
    return [out async for out in engine.generate(request_id, prompt, params)]


@pytest.mark.parametrize("case", CASES)
def test_streamed_outputs_add_up_to_the_offline_result(llm_f32, async_engine, case):
    prompt, params = CASES[case]
    expected = llm_f32.generate(prompt, params)[0]
    outputs = asyncio.run(_collect(async_engine, "r", prompt, params))
    final = outputs[-1]
    assert final.finished and not any(o.finished for o in outputs[:-1])
    assert final.prompt == prompt and final.prompt_token_ids == expected.prompt_token_ids
    assert final.metrics["arrival_time"] <= final.metrics["first_token_time"] <= final.metrics["finished_time"]
    for want in expected.outputs:  # each output holds only what is new: the deltas add up to the whole
        deltas = [c for o in outputs for c in o.outputs if c.index == want.index]
        assert [t for c in deltas for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in deltas) == want.text  # held-back stop-string prefixes released or dropped
        assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (want.finish_reason, want.stop_reason)
        assert deltas[-1].cumulative_logprob == want.cumulative_logprob
        assert want.logprobs is None or [lp for c in deltas for lp in c.logprobs] == want.logprobs


def test_abort_frees_blocks_and_later_requests_run(llm_f32, async_engine):
    async def run() -> None:
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        generated = 0
        async for out in async_engine.generate("long", "Tell me a long story", params):
            generated += len(out.outputs[0].token_ids)
            if generated >= 3:
                assert async_engine.stats.kv_blocks_used > 0
                break  # leaving the iterator aborts the request
        deadline = asyncio.get_running_loop().time() + 10
        while async_engine.stats.kv_blocks_used or async_engine.stats.num_running:
            assert asyncio.get_running_loop().time() < deadline, async_engine.stats
            await asyncio.sleep(0.01)
        assert async_engine.num_in_flight == 0
        outs = await _collect(async_engine, "next", "Hi", SamplingParams(temperature=0, max_tokens=3))
        assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == 3

    asyncio.run(run())


def test_core_process_shares_the_weights(llm_f32, async_engine):
    asyncio.run(_collect(async_engine, "warm", "Hello", SamplingParams(temperature=0, max_tokens=4)))
    weights = sum(t.numel() * t.element_size() for t in [*llm_f32.model.parameters(), *llm_f32.model.buffers()])
    rollup = open(f"/proc/{async_engine.core_pid}/smaps_rollup").read()
    private = sum(int(m) * 1024 for m in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", rollup, re.M))
    assert weights > 100 * 2**20
    assert private < weights / 4, (f"the core holds {private / 2**20:.0f} MiB of its own "
                                   f"(weights: {weights / 2**20:.0f} MiB)")


def _voluntary_switches(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = open(f"/proc/{pid}/task/{tid}/status").read()
        total += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
    return total


def test_core_openmp_workers_spin_between_ops_like_offline(llm_f32, async_engine):
    """The team that built the model is released before the fork, so libgomp counts no more threads than CPUs
    in the core and lets its workers spin between ops. Otherwise each worker sleeps after ~100 spins and every
    parallel op wakes it: dozens of voluntary context switches per decode token instead of about one."""
    async def decode(n: int) -> int:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        gen = async_engine.generate(f"spin{n}", "Tell me a long story", params)
        await anext(gen)  # prefill done: count the decode steps only
        before = _voluntary_switches(async_engine.core_pid)
        async for _ in gen:
            pass
        return _voluntary_switches(async_engine.core_pid) - before

    per_token = asyncio.run(decode(41)) / 40
    assert per_token < 8, f"{per_token:.1f} voluntary context switches per token in the engine core"


def test_shutdown_stops_the_core_and_is_idempotent(async_engine):
    async_engine.shutdown()
    async_engine.shutdown()
    assert not async_engine.is_alive

    async def after() -> None:
        with pytest.raises(EngineDeadError):
            await _collect(async_engine, "late", "Hi", SamplingParams(max_tokens=2))

    asyncio.run(after())
