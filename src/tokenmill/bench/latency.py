"""`bench latency`: one request at a time, so prefill and decode speed are measured without batching effects.

Each iteration sends a fresh prompt of exactly --input-len real-text tokens (a different corpus window, so the
prefix cache cannot serve it) and decodes exactly --output-len tokens (greedy, EOS ignored). Timed around the
engine's own step loop: TTFT = add_request to the first token, decode = first token to the last.
Prefill tok/s = input_len / TTFT; decode tok/s = (output_len - 1) / decode time.
"""
from __future__ import annotations

import random
import resource
import statistics
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from tokenmill.bench import BenchError
from tokenmill.bench.datasets import corpus_tokens
from tokenmill.bench.metrics import distribution
from tokenmill.bench.report import Row, table
from tokenmill.bench.spec_stats import spec_decode_rows, spec_decode_summary

if TYPE_CHECKING:
    from tokenmill.engine_args import EngineArgs


def time_one(engine: Any, request_id: str, prompt_ids: list[int], output_len: int) -> dict[str, float]:
    """Seconds to the first token and to the end of one request run alone through engine.step()."""
    from tokenmill import SamplingParams

    started = time.perf_counter()
    engine.add_request(request_id, prompt_ids, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - started
    return {"ttft_s": first if first is not None else float("nan"), "e2e_s": time.perf_counter() - started}


def run_latency(engine_args: EngineArgs, input_len: int, output_len: int, num_iters: int, num_warmups: int,
                seed: int) -> dict[str, Any]:
    from tokenmill.hardware import memory_read_bandwidth
    from tokenmill.model.build import weight_bytes_per_token

    if input_len < 1 or output_len < 2 or num_iters < 1:
        raise BenchError("bench latency needs --input-len >= 1, --output-len >= 2 (decode speed needs a second "
                         "token) and --num-iters >= 1")
    llm = engine_args.create_llm(progress=True)
    corpus = corpus_tokens(llm.tokenizer)
    rng = random.Random(seed)
    starts = rng.sample(range(len(corpus)), min(len(corpus), num_warmups + num_iters))
    iterations = []
    # the bar redraws between requests, outside the timed part
    for i in tqdm(range(num_warmups + num_iters), desc="requests (warm-up first)", unit="request"):
        if i == num_warmups:
            stats_before = llm.engine.stats()
        start = starts[i % len(starts)]
        ids = [corpus[(start + k) % len(corpus)] for k in range(input_len)]
        timing = time_one(llm.engine, f"latency-{i}", ids, output_len)
        if i >= num_warmups:
            decode = timing["e2e_s"] - timing["ttft_s"]
            iterations.append({**timing, "prefill_tok_s": input_len / timing["ttft_s"],
                               "decode_tok_s": (output_len - 1) / decode})
    e2e = distribution([it["e2e_s"] for it in iterations])
    decode_tok_s = statistics.median(it["decode_tok_s"] for it in iterations)
    weight_bytes = weight_bytes_per_token(llm.model)
    bandwidth = memory_read_bandwidth()
    return {"input_len": input_len, "output_len": output_len, "num_iters": num_iters, "load_s": llm.load_seconds,
            "e2e_ms": asdict(e2e) if e2e else None,
            "median_ttft_ms": 1000 * statistics.median(it["ttft_s"] for it in iterations),
            "median_prefill_tok_s": statistics.median(it["prefill_tok_s"] for it in iterations),
            "median_decode_tok_s": decode_tok_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weight_bytes_per_token": weight_bytes, "memory_read_gb_s": bandwidth / 1e9,
            "achieved_weight_gb_s": weight_bytes * decode_tok_s / 1e9,
            "bandwidth_fraction": weight_bytes * decode_tok_s / bandwidth,
            "spec_decode": spec_decode_summary(stats_before, llm.engine.stats()),
            "iterations": iterations}


def latency_table(summary: dict[str, Any]) -> str:
    e2e = summary["e2e_ms"] or {}
    rows: list[Row] = [("Input / output tokens", f"{summary['input_len']} / {summary['output_len']}"),
                       ("Iterations", summary["num_iters"]), ("Median TTFT (ms)", summary["median_ttft_ms"]),
                       ("Median prefill (tok/s)", summary["median_prefill_tok_s"]),
                       ("Median decode (tok/s)", summary["median_decode_tok_s"]),
                       ("Peak resident memory (MiB)", summary["peak_rss_mib"]),
                       ("Weight bytes read per token (MB)", summary["weight_bytes_per_token"] / 1e6),
                       ("Memory read bandwidth (GB/s)", summary["memory_read_gb_s"]),
                       ("Weights streamed at (GB/s)", summary["achieved_weight_gb_s"]),
                       ("Fraction of memory bandwidth", summary["bandwidth_fraction"])]
    rows += [(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} request latency (ms)",
              e2e.get(stat)) for stat in ("mean", "median", "p90", "p99")]
    sections = [(None, rows)]
    if summary.get("spec_decode"):
        sections.append(("Speculative Decoding", spec_decode_rows(summary["spec_decode"])))
    return table("Single-request Latency Result", sections)
