"""Issue 8 scoreboard: the catalog's real models on tokenmill against llama.cpp on the same GGUF, in one run.

Run:  python benchmarks/models.py --out benchmarks/results/models   (quiet machine, nothing else running)

For each model (default: qwen2.5-coder-1.5b and gemma3-270m, both Q4_K_M):
- ready: `tokenmill serve` and `llama-server` (8 slots) each started alone on the GGUF: seconds from start to
  /health 200, cold (the page cache dropped first, which needs root; tokenmill's weight cache stays on disk)
  and warm (started again at once), then the seconds from start to the end of a first 16-token completion (a
  server that maps its weights without touching them pays for reading them there), and the memory at warm ready
  and after that first answer, as PSS summed over the server's processes (tokenmill's engine core shares the
  weights copy-on-write, so they count once; llama.cpp's mmapped GGUF counts as it is resident).
- single stream: `tokenmill bench latency` (512-token prompt, 64 new tokens, greedy, median of 3 after a
  warm-up, in a fresh process) for load time, peak RSS, prefill and decode tok/s and the fraction of memory
  bandwidth that streaming the weights reaches at batch 1; `llama-bench -p 512 -n 64` on the same GGUF.
- throughput at 8 and 32 concurrent requests: `tokenmill bench compare` (a fresh `tokenmill serve` and
  `llama-server --parallel C` per run, `bench serve`'s load generator, random 128-token prompts, 128 tokens
  out, EOS ignored, greedy); its report and per-run JSON stay under OUT/<model>/compare.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from quantized import (  # benchmarks/ is sys.path[0] when run as a script
    IK_PEERS,
    PEERS,
    llama_bench,
    llama_bench_decode_at,
    run,
    tokenmill_latency,
)

from tokenmill.bench.peers import ServerProcess, free_port, llama_server, tokenmill_server
from tokenmill.config import DEFAULT_KV_CACHE_MEMORY
from tokenmill.hardware import describe
from tokenmill.model.loader.catalog import resolve_model

PROMPT_LEN = 512  # single-stream prefill
READY_SLOTS = 8  # llama-server's --parallel for the ready measurement
CTX_PER_SLOT = 2048


def tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and all its descendants: shared pages split among their sharers."""
    total_kib, pending = 0, [pid]
    while pending:
        p = pending.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            pending += [int(c) for t in Path(f"/proc/{p}/task").iterdir()
                        for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        total_kib += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total_kib / 1024


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so the next start reads its files from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def ready(server: ServerProcess, timeout_s: float) -> tuple[float, float, float, float]:
    """(seconds from start to /health 200, PSS MiB then, seconds from start to the end of a first 16-token
    completion, PSS MiB after it), the server stopped afterwards. The first answer is where a server that maps its
    weights without touching them pays for reading them."""
    with server:
        started = time.perf_counter()
        server.start(timeout_s)
        seconds = time.perf_counter() - started
        pss = tree_pss_mib(server.process.pid)
        body = json.dumps({"prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0}).encode()
        request = urllib.request.Request(f"{server.base_url}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
        return seconds, pss, time.perf_counter() - started, tree_pss_mib(server.process.pid)


def throughputs(model: str, concurrencies: list[int], num_prompts: int, output_len: int, kv_cache_memory: int,
                out: Path) -> dict[tuple[str, int], float]:
    """(peer, C) -> output tok/s, from `tokenmill bench compare`'s per-run results."""
    peers = ["tokenmill", "llama.cpp"] if PEERS.exists() else ["tokenmill"]
    run(["tokenmill", "bench", "compare", "--model", model, "--peers", *peers, "--dataset", "random",
         "--input-len", "128", "--output-len", str(output_len), "--num-prompts", str(num_prompts),
         "--concurrency", *map(str, concurrencies), "--kv-cache-memory", str(kv_cache_memory),
         "--ctx-per-slot", str(CTX_PER_SLOT), "-o", str(out)], out.with_suffix(".log"))
    return {(peer, c): json.loads((out / f"{peer}_c{c}.json").read_text())["metrics"]["output_throughput"]
            for peer in peers for c in concurrencies}


def measure(name: str, args: argparse.Namespace) -> list[str]:
    """This model's rows of the three tables."""
    gguf = resolve_model(name)
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    def start_twice(server: Callable[[str], ServerProcess]) -> tuple[float, ...]:
        """(cold ready s, cold first answer s, warm ready s, PSS MiB at warm ready, warm first answer s, PSS MiB
        after it)."""
        cold = ready(server("cold"), args.startup_timeout) if drop_page_cache() else (float("nan"),) * 4
        return cold[0], cold[2], *ready(server("warm"), args.startup_timeout)

    ours, peer_ready, stream = [], [], collections.defaultdict(list)
    for r in range(args.rounds):  # the engines take turns, so a slow spell of the machine hits them alike
        ours.append(start_twice(lambda kind, r=r: tokenmill_server(gguf, "auto", args.kv_cache_memory, free_port(),
                                                                   out / f"ready_tokenmill_{kind}_{r}.log")))
        if PEERS.exists():
            peer_ready.append(start_twice(lambda kind, r=r: llama_server(PEERS / "llama-server", gguf, READY_SLOTS,
                                                                         CTX_PER_SLOT, 2, free_port(),
                                                                         out / f"ready_llama_{kind}_{r}.log")))
        for engine, sample in single_stream(name, gguf, out, r).items():
            stream[engine].append(sample)
    ours_ready = _medians(ours)
    peer_ready = _medians(peer_ready) if peer_ready else (float("nan"),) * 6
    lat = {engine: dict(zip(samples[0], _medians([tuple(x.values()) for x in samples])))
           for engine, samples in stream.items()}
    nan = dict.fromkeys(("prefill", "decode0", "decode"), float("nan"))
    peer, ik = lat.get("llama.cpp", nan), lat.get("ik_llama.cpp", nan)
    ours_lat = lat["tokenmill"]
    tput = (throughputs(name, args.concurrency, args.num_prompts, args.output_len, args.kv_cache_memory,
                        out / "compare") if args.concurrency else {})
    bandwidth = f"{100 * ours_lat['bandwidth_fraction']:.0f}% of {ours_lat['memory_read_gb_s']:.0f} GB/s"
    return [
        f"| {name} | tokenmill | {_ready_cells(ours_ready)} | {ours_lat['load_s']:.1f} | "
        f"{ours_lat['peak_rss_mib']:.0f} | {_stream_cells(ours_lat)} | {bandwidth} |"
        + "".join(f" {tput['tokenmill', c]:.0f} |" for c in args.concurrency),
        f"| {name} | llama.cpp | {_ready_cells(peer_ready)} | | | {_stream_cells(peer)} | |"
        + "".join(f" {tput.get(('llama.cpp', c), float('nan')):.0f} |" for c in args.concurrency),
        f"| {name} | ik_llama.cpp -rtr | | | | | | | | | {_stream_cells(ik)} | |" + " |" * len(args.concurrency),
    ]


def single_stream(name: str, gguf: Path, out: Path, r: int) -> dict[str, dict[str, float]]:
    """One round: engine -> prefill tok/s of the 512-token prompt, decode tok/s from an empty context (`decode0`,
    llama-bench's tg64) and after the 512-token prompt (`decode`, what `bench latency` times; llama-bench's tg64
    @ d512), with tokenmill's load time, peak RSS and bandwidth figures."""
    lat = tokenmill_latency(["--model", name], out / f"latency_{r}", PROMPT_LEN)
    short = tokenmill_latency(["--model", name], out / f"latency_short_{r}", 1)
    results = {"tokenmill": {"prefill": lat["median_prefill_tok_s"], "decode0": short["median_decode_tok_s"],
                             "decode": lat["median_decode_tok_s"], "load_s": lat["load_s"],
                             "peak_rss_mib": lat["peak_rss_mib"], "bandwidth_fraction": lat["bandwidth_fraction"],
                             "memory_read_gb_s": lat["memory_read_gb_s"]}}
    for engine, bin_dir, extra in (("llama.cpp", PEERS, ()), ("ik_llama.cpp", IK_PEERS, ("-rtr", "1"))):
        if not bin_dir.exists():
            continue
        stem = engine.split(".")[0]
        d0 = llama_bench(gguf, out / f"{stem}-bench_{r}.json", bin_dir, *extra, prompt_len=PROMPT_LEN)
        deep = llama_bench_decode_at(gguf, PROMPT_LEN, out / f"{stem}-bench-d{PROMPT_LEN}_{r}.json", bin_dir, *extra)
        results[engine] = {"prefill": d0["prefill"], "decode0": d0["decode"], "decode": deep}
    return results


def _medians(samples: list[tuple[float, ...]]) -> tuple[float, ...]:
    return tuple(statistics.median(column) for column in zip(*samples))


def _stream_cells(r: dict[str, float]) -> str:
    """prefill | decode from an empty context | decode after the prompt."""
    return f"{r['prefill']:.0f} | {r['decode0']:.1f} | {r['decode']:.1f}"


def _ready_cells(r: tuple[float, ...]) -> str:
    """ready cold | first answer cold | ready warm | first answer warm | PSS at ready | PSS after first answer."""
    return f"{r[0]:.1f} | {r[1]:.1f} | {r[2]:.1f} | {r[4]:.1f} | {r[3]:.0f} | {r[5]:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="tiny smoke run: python benchmarks/models.py --models smollm2-135m "
                                            "--concurrency 2 --num-prompts 4 --output-len 16 --out /tmp/models")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/models"))
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-1.5b", "gemma3-270m"],
                        help="catalog names (`tokenmill models`)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[8, 32],
                        help="throughput runs (none: ready time and single stream only)")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per throughput run (at least 2 x C)")
    parser.add_argument("--output-len", type=int, default=128, help="tokens out per throughput request")
    parser.add_argument("--kv-cache-memory", type=int, default=DEFAULT_KV_CACHE_MEMORY, help="tokenmill's, bytes")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the ready and single-stream measurements (medians reported)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"CPU: {json.dumps(describe())}", f"command: {' '.join(sys.argv)}", "",
             "| model | engine | ready s cold | first answer s cold | ready s warm | first answer s warm | "
             "PSS at ready MiB | PSS after first answer MiB | load s | peak RSS (bench latency) MiB | "
             f"prefill {PROMPT_LEN} tok/s | decode tok/s @0 | decode tok/s @{PROMPT_LEN} | bandwidth at batch 1 | "
             + "".join(f" out tok/s @{c} |" for c in args.concurrency),
             "|---|---|" + "---:|" * (12 + len(args.concurrency))]
    for name in args.models:
        lines += measure(name, args)
    report = "\n".join(lines)
    (args.out / "models.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        sys.exit(f"{' '.join(exc.cmd)} failed (exit {exc.returncode}); its log is beside the results")
