"""`bench offline`: throughput of LLM.generate over a whole dataset submitted at once (no HTTP, no arrivals).

This is the engine's ceiling: the best a server built on it could do with every request queued up front.
Token counts are what the engine actually processed and produced.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tokenmill.bench.datasets import SampleRequest
from tokenmill.bench.report import Row, table
from tokenmill.bench.spec_stats import spec_decode_rows, spec_decode_summary

if TYPE_CHECKING:
    from tokenmill.engine_args import EngineArgs


def run_offline(requests: list[SampleRequest], engine_args: EngineArgs, ignore_eos: bool) -> dict[str, Any]:
    from tokenmill import SamplingParams

    llm = engine_args.create_llm(progress=True)
    llm.generate("Warm-up.", SamplingParams(temperature=0, max_tokens=4))  # first-call allocations, not timed
    prompts = [f"{r.system}\n\n{r.prompt}" if r.system else r.prompt for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=ignore_eos) for r in requests]
    stats_before = llm.engine.stats()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - started
    spec = spec_decode_summary(stats_before, llm.engine.stats())
    inputs = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"num_requests": len(requests), "elapsed_s": elapsed, "load_s": llm.load_seconds,
            "total_input_tokens": inputs, "total_output_tokens": generated,
            "request_throughput": len(requests) / elapsed, "input_throughput": inputs / elapsed,
            "output_throughput": generated / elapsed, "total_token_throughput": (inputs + generated) / elapsed,
            "spec_decode": spec}


def offline_table(summary: dict[str, Any]) -> str:
    rows: list[Row] = [("Requests", summary["num_requests"]), ("Model load (s)", summary["load_s"]),
                       ("Elapsed (s)", summary["elapsed_s"]), ("Total input tokens", summary["total_input_tokens"]),
                       ("Total generated tokens", summary["total_output_tokens"]),
                       ("Request throughput (req/s)", summary["request_throughput"]),
                       ("Input token throughput (tok/s)", summary["input_throughput"]),
                       ("Output token throughput (tok/s)", summary["output_throughput"]),
                       ("Total token throughput (tok/s)", summary["total_token_throughput"])]
    sections = [(None, rows)]
    if summary.get("spec_decode"):
        sections.append(("Speculative Decoding", spec_decode_rows(summary["spec_decode"])))
    return table("Offline Throughput Result", sections)
