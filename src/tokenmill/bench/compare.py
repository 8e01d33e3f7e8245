"""`bench compare`: the same workloads against tokenmill serve and its peers (peers.py), as ratios.

tokenmill and llama-server serve the same GGUF, vLLM and transformers an HF copy of it (dequantized, in
tokenmill's compute dtype); all on loopback, run one after the other (never at once: on 2 cores they would
share the CPU). Every run at concurrency C gets the same first max(--num-prompts, --min-rounds * C) requests of
one seeded dataset, the same warm-up and the same concurrency. Each run gets a freshly started server, so no
prefix cache carries prompts over from an earlier run; llama-server gets C slots (`--parallel C`), the others
schedule any number of requests. Each run's full results JSON is kept beside the markdown table.
"""
from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenmill.bench import BenchError
from tokenmill.bench.datasets import DEFAULT_OUTPUT_LEN, DatasetConfig, SampleRequest, build_requests
from tokenmill.bench.load_generator import ServeConfig
from tokenmill.bench.peers import (
    PEERS,
    ServerProcess,
    check_transformers_serve,
    find_hf_model,
    find_llama_server,
    find_vllm,
    free_port,
    llama_server,
    tokenmill_server,
    transformers_server,
    vllm_server,
)
from tokenmill.bench.report import save_result
from tokenmill.bench.serve import serve_benchmark
from tokenmill.config import DEFAULT_KV_CACHE_MEMORY
from tokenmill.hardware import DTYPES, resolve_dtype

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
    vllm_venv: str | None = None
    hf_model: str | None = None  # the HF copy vllm and transformers serve; None: setup.sh's, for the default model
    default_model: bool = True  # gguf is the embedded default model (then the HF copy may be found for it)
    min_rounds: int = 2  # each run sends at least min_rounds * C requests, so C stay in flight most of the time
    startup_timeout_s: float = 300.0
    slos_ms: dict[str, float] | None = None


@dataclass(frozen=True)
class Located:
    """What the peers need, found before any run so a missing one fails at once."""

    dtype: str  # tokenmill's compute dtype, also given to vllm and transformers
    llama_server: Path | None = None
    vllm_venv: Path | None = None
    hf_model: Path | None = None


def locate_peers(config: CompareConfig) -> Located:
    """Check every chosen peer's setup; one error lists each missing piece and how to get it."""
    unknown = set(config.peers) - set(PEERS)
    if unknown or not config.peers:
        raise BenchError(f"--peers takes some of {', '.join(PEERS)}, got {', '.join(config.peers) or 'none'}")
    problems: list[str] = []

    def attempt(find: Callable[[], Any]) -> Any:
        try:
            return find()
        except BenchError as exc:
            problems.append(str(exc))
            return None

    peers = set(config.peers)
    located = Located(
        dtype={v: k for k, v in DTYPES.items()}[resolve_dtype(config.dtype)],
        llama_server=attempt(lambda: find_llama_server(config.llama_server)) if "llama.cpp" in peers else None,
        vllm_venv=attempt(lambda: find_vllm(config.vllm_venv)) if "vllm" in peers else None,
        hf_model=(attempt(lambda: find_hf_model(config.hf_model, config.default_model))
                  if peers & {"vllm", "transformers"} else None))
    if "transformers" in peers:
        attempt(check_transformers_serve)
    if problems:
        raise BenchError("\n".join(problems))
    return located


def requests_for(requests: list[SampleRequest], config: CompareConfig, concurrency: int) -> list[SampleRequest]:
    """The first max(--num-prompts, min_rounds * C): the same for every peer, and enough to keep C in flight."""
    return requests[:max(config.dataset.num_prompts, config.min_rounds * concurrency)]


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
    return f"{source}, seed {ds.seed}, {output}"


def _unequal_work(runs: dict[str, dict[str, Any] | None]) -> bool:
    """Peers that generated different token counts did different work, so their throughputs do not compare."""
    return len({d["metrics"]["total_output_tokens"] for d in runs.values() if d}) > 1


def markdown(config: CompareConfig, results: dict[tuple[str, int], dict[str, Any]]) -> str:
    """One table per concurrency: each peer's number and tokenmill / peer for every other peer."""
    first = next(iter(results.values()))
    hw, ds = first["hardware"], config.dataset
    commands = {peer: [*(f"{k}={v}" for k, v in doc.get("server_env", {}).items()), *doc["server_command"]]
                for (peer, _), doc in results.items() if doc.get("server_command")}  # the last C's
    lines = ["# tokenmill serve vs peers", "",
             f"- command: `{shlex.join(['tokenmill', *sys.argv[1:]])}`",
             f"- date: {first['date']}; CPU {hw['cpu']} ({hw['torch_capability']}), torch {hw['torch']}, "
             f"flags: {hw['flags']}",
             f"- model: {config.gguf.name} (tokenmill --dtype {config.dtype}, llama.cpp); vllm and transformers "
             "serve an HF copy of it in tokenmill's compute dtype",
             *(f"- {peer} server: `{shlex.join(command)}`" for peer, command in commands.items()),
             f"- workload: {describe_dataset(ds)}, endpoint {config.endpoint}, ignore_eos {config.ignore_eos}, "
             f"greedy; each run sends max({ds.num_prompts}, {config.min_rounds} x C) requests (the same first ones "
             "to every peer), all queued at once, at most C in flight; one warm-up request first",
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
        if _unequal_work(runs):
            lines += ["**The servers generated different numbers of tokens here**, so their throughputs compare "
                      "unequal work (a server that ignored ignore_eos, or failed requests).", ""]
    return "\n".join(lines)


def _server(peer: str, config: CompareConfig, located: Located, concurrency: int, port: int,
            log: Path) -> ServerProcess:
    if peer == "tokenmill":
        return tokenmill_server(config.gguf, config.dtype, config.kv_cache_memory, port, log)
    if peer == "llama.cpp":
        return llama_server(located.llama_server, config.gguf, concurrency, config.ctx_per_slot, config.threads,
                            port, log)
    if peer == "vllm":
        return vllm_server(located.vllm_venv, located.hf_model, located.dtype, config.kv_cache_memory, port, log)
    return transformers_server(located.hf_model, located.dtype, config.kv_cache_memory, port, log)


def _run_workload(server: ServerProcess, config: CompareConfig, concurrency: int, requests: list[SampleRequest],
                  busy_before: float | None, results: dict[tuple[str, int], dict[str, Any]]) -> None:
    serve = ServeConfig(base_url=server.base_url, endpoint=config.endpoint, backend=server.backend,
                        max_concurrency=concurrency, request_rate=math.inf, seed=config.dataset.seed,
                        ignore_eos=config.ignore_eos)
    print(f"{server.name}: concurrency {concurrency}, {len(requests)} requests", flush=True)
    dataset = replace(config.dataset, num_prompts=len(requests))
    document, text = serve_benchmark(serve, dataset, requests, config.slos_ms or {}, server.name)
    document |= {"server_command": server.command, "server_env": server.env, "cpu_busy_before": busy_before}
    save_result(config.output_dir / f"{server.name}_c{concurrency}.json", document)
    print(text, flush=True)
    results[server.name, concurrency] = document


def run_compare(config: CompareConfig) -> Path:
    """Run every peer at every concurrency; returns the markdown report's path."""
    if not config.concurrencies or min(config.concurrencies) < 1:
        raise BenchError("every --concurrency must be >= 1")
    if config.min_rounds < 0:
        raise BenchError(f"--min-rounds must be >= 0, got {config.min_rounds}")
    located = locate_peers(config)  # fail before any run
    most = max(config.dataset.num_prompts, config.min_rounds * max(config.concurrencies))
    config = replace(config, dataset=replace(config.dataset, tokenizer=str(config.gguf)))  # cut by its tokenizer
    requests = build_requests(replace(config.dataset, num_prompts=most))
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for peer in config.peers:
        for c in config.concurrencies:
            port, log = free_port(), config.output_dir / "logs" / f"{peer}_c{c}.log"
            server = _server(peer, config, located, c, port, log)
            busy = cpu_busy()
            if busy is not None and busy > BUSY:
                print(f"warning: the CPU is {busy:.0%} busy before {peer} starts; other work on these cores "
                      "distorts every timing", flush=True)
            with server:
                server.start(config.startup_timeout_s)
                _run_workload(server, config, c, requests_for(requests, config, c), busy, results)
    path = config.output_dir / "compare.md"
    path.write_text(markdown(config, results))
    return path
