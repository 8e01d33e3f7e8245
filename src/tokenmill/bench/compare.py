"""`bench compare`: the same workloads against tokenmill serve and llama.cpp's llama-server, as ratios.

Both serve the same GGUF on loopback and are run one after the other (never at once: on 2 cores they would
share the CPU). Every run gets the identical request list (one seeded dataset), the same warm-up and the same
concurrency. Each run gets freshly started servers, so no prefix cache carries prompts over from an earlier
run; llama-server gets C slots (`--parallel C`), tokenmill's scheduler takes any number of requests. Each run's
full results JSON is kept beside the markdown table.
"""
from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenmill.bench import BenchError
from tokenmill.bench.datasets import DEFAULT_OUTPUT_LEN, DatasetConfig, SampleRequest, build_requests
from tokenmill.bench.load_generator import ServeConfig
from tokenmill.bench.peers import ServerProcess, find_llama_server, free_port, llama_server, tokenmill_server
from tokenmill.bench.report import save_result
from tokenmill.bench.serve import serve_benchmark
from tokenmill.config import DEFAULT_KV_CACHE_MEMORY

PEERS = ("tokenmill", "llama.cpp")
BUSY = 0.10  # share of the CPU that other work may use before a run without its timings being suspect
# (label, metric key, statistic or None for a top-level number); throughput: higher is better, latency: lower.
ROWS = (("Request throughput (req/s)", "request_throughput", None),
        ("Output token throughput (tok/s)", "output_throughput", None),
        ("Total token throughput (tok/s)", "total_token_throughput", None),
        ("Median TTFT (ms)", "ttft_ms", "median"), ("P99 TTFT (ms)", "ttft_ms", "p99"),
        ("Median TPOT (ms)", "tpot_ms", "median"), ("P99 TPOT (ms)", "tpot_ms", "p99"),
        ("Median ITL (ms)", "itl_ms", "median"), ("Median E2E latency (ms)", "e2el_ms", "median"),
        ("P99 E2E latency (ms)", "e2el_ms", "p99"))


@dataclass
class CompareConfig:
    dataset: DatasetConfig
    concurrencies: list[int]
    peers: list[str]
    gguf: Path
    output_dir: Path
    endpoint: str = "completions"
    ignore_eos: bool = True  # equal output lengths on both servers, so throughputs compare like for like
    dtype: str = "auto"
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY
    ctx_per_slot: int = 2048
    threads: int = 2
    llama_server: str | None = None
    startup_timeout_s: float = 300.0
    slos_ms: dict[str, float] | None = None


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of all cores' time spent busy over `seconds` (from /proc/stat): other work would skew a run."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _metric(document: dict[str, Any], key: str, stat: str | None) -> float | None:
    value = document["metrics"].get(key)
    return value if stat is None or value is None else value[stat]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def describe_dataset(ds: DatasetConfig) -> str:
    source = {"random": f"random (input {ds.input_len[0]}..{ds.input_len[1]} tokens)",
              "shared-prefix": f"shared-prefix ({ds.prefix_len}-token shared system prompt)",
              "sharegpt": f"sharegpt ({ds.path})", "builtin": "builtin prompts"}[ds.name]
    out = ds.output_len or (None if ds.name == "sharegpt" else DEFAULT_OUTPUT_LEN)
    output = f"output {out[0]}..{out[1]} tokens" if out else "output as recorded"
    return f"{source}, {ds.num_prompts} prompts, seed {ds.seed}, {output}"


def markdown(config: CompareConfig, results: dict[tuple[str, int], dict[str, Any]]) -> str:
    """One table per concurrency: each peer's number and tokenmill / peer for every other peer."""
    first = next(iter(results.values()))
    hw, ds = first["hardware"], config.dataset
    lines = ["# tokenmill serve vs peers", "",
             f"- command: `{shlex.join(['tokenmill', *sys.argv[1:]])}`",
             f"- date: {first['date']}; CPU {hw['cpu']} ({hw['torch_capability']}), torch {hw['torch']}, "
             f"flags: {hw['flags']}",
             f"- model: {config.gguf.name}; tokenmill --dtype {config.dtype}; llama-server -t {config.threads} "
             f"--parallel C -c {config.ctx_per_slot}*C --cont-batching",
             f"- workload: {describe_dataset(ds)}, endpoint {config.endpoint}, ignore_eos {config.ignore_eos}, "
             "greedy; all requests queued at once, at most C in flight; one warm-up request first",
             "- CPU busy (all cores, 1 s) just before each server started: " + ", ".join(
                 f"{peer} c={c} {_percent(doc.get('cpu_busy_before'))}" for (peer, c), doc in results.items()),
             "- ratios are tokenmill / peer: above 1 is better for throughput, below 1 is better for latency",
             "- the load generator runs on the same machine as the servers, so it shares their CPU", ""]
    ratio_to = [p for p in config.peers if p != "tokenmill"] if "tokenmill" in config.peers else []
    for c in config.concurrencies:
        runs = dict(zip(config.peers, (results.get((p, c)) for p in config.peers)))
        rows = [["requests", *(f"{d['metrics']['completed']} ok / {d['metrics']['failed']} failed, "
                               f"{d['metrics']['total_output_tokens']} tokens out" if d else "not run"
                               for d in runs.values()), *([""] * len(ratio_to))]]
        for label, key, stat in ROWS:
            values = {p: _metric(d, key, stat) if d else None for p, d in runs.items()}
            mine = values.get("tokenmill")
            rows.append([label, *map(_fmt, values.values()),
                         *(f"{mine / values[p]:.2f}x" if mine is not None and values[p] else "n/a" for p in ratio_to)])
        header = ["metric", *config.peers, *(f"tokenmill / {p}" for p in ratio_to)]
        lines += [f"## Concurrency {c}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def _run_workload(server: ServerProcess, config: CompareConfig, concurrency: int, requests: list[SampleRequest],
                  busy_before: float | None, results: dict[tuple[str, int], dict[str, Any]]) -> None:
    serve = ServeConfig(base_url=server.base_url, endpoint=config.endpoint, max_concurrency=concurrency,
                        request_rate=math.inf, seed=config.dataset.seed, ignore_eos=config.ignore_eos)
    print(f"{server.name}: concurrency {concurrency}, {len(requests)} requests", flush=True)
    document, text = serve_benchmark(serve, config.dataset, requests, config.slos_ms or {}, server.name)
    document |= {"server_command": server.command, "cpu_busy_before": busy_before}
    save_result(config.output_dir / f"{server.name}_c{concurrency}.json", document)
    print(text, flush=True)
    results[server.name, concurrency] = document


def run_compare(config: CompareConfig) -> Path:
    """Run every peer at every concurrency; returns the markdown report's path."""
    unknown = set(config.peers) - set(PEERS)
    if unknown or not config.peers:
        raise BenchError(f"--peers takes some of {', '.join(PEERS)}, got {', '.join(config.peers) or 'none'}")
    if min(config.concurrencies) < 1:
        raise BenchError("every --concurrency must be >= 1")
    binary = find_llama_server(config.llama_server) if "llama.cpp" in config.peers else None  # fail before any run
    config = replace(config, dataset=replace(config.dataset, tokenizer=str(config.gguf)))  # cut by its tokenizer
    requests = build_requests(config.dataset)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for peer in config.peers:
        for c in config.concurrencies:
            port, log = free_port(), config.output_dir / "logs" / f"{peer}_c{c}.log"
            server = (tokenmill_server(config.gguf, config.dtype, config.kv_cache_memory, port, log)
                      if peer == "tokenmill" else
                      llama_server(binary, config.gguf, c, config.ctx_per_slot, config.threads, port, log))
            busy = cpu_busy()
            if busy is not None and busy > BUSY:
                print(f"warning: the CPU is {busy:.0%} busy before {peer} starts; other work on these cores "
                      "distorts every timing", flush=True)
            with server:
                server.start(config.startup_timeout_s)
                _run_workload(server, config, c, requests, busy, results)
    path = config.output_dir / "compare.md"
    path.write_text(markdown(config, results))
    return path
