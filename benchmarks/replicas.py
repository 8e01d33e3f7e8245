"""Issue 24 scoreboard: the Ray Serve path's overhead, prefix-affine vs round-robin routing, result-cache hits.

Run:  python benchmarks/replicas.py --out benchmarks/results/replicas   (quiet machine; --model: default model)

- overhead: `tokenmill serve` against `tokenmill serve --replicas 1` (same engine settings), `tokenmill bench
  serve` at 1 and 16 concurrent (random 256-token prompts, 64 output tokens, ignore_eos), in interleaved rounds;
- routing: `--replicas 2 --threads 1` with `--routing prefix` and `--routing round-robin`, on 16 tenants' system
  prompts (`--dataset shared-prefix --num-prefixes 16`) at 8 concurrent, with a KV cache that holds about half
  of the tenants' prefixes per replica (`--kv-cache-memory`); prefix-cache hit rate from the replicas' /metrics
  (prompt tokens found cached / looked up, summed over replicas), TTFT from the load generator;
- result cache: the same greedy request sent again and again, one at a time, to a server with `--result-cache
  memory` and with `--result-cache redis://...` (a redis-server started here when installed); client-side
  latency of the hits.
Every server is started and stopped here, one at a time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tokenmill.bench.peers import free_port
from tokenmill.hardware import describe


def start(model: str | None, *flags: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", *([model] if model else []), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                # the first request through a fresh path (Ray's router starts with it) is not timed
                httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=120)
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{' '.join(cmd)} not healthy in 600 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True,
                   check=False)


def bench(url: str, out: Path, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--base-url", url, "--save-result", str(out),
           "--disable-tqdm", "--num-warmups", "0", *flags]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.read_text())["metrics"]


def prefix_counts(url: str) -> tuple[float, float]:
    queries = hits = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("tokenmill:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
        elif line.startswith("tokenmill:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
    return queries, hits


def overhead(model: str | None, engine: list[str], rounds: int, work: Path, threads: int | None) -> list[dict]:
    """threads: the engine's (both servers'); None: all cores (the replica gets them too, cores / 1)."""
    rows = []
    engine = [*engine, *(["--threads", str(threads)] if threads else [])]
    for r in range(rounds):
        for name, extra in (("plain", []), ("ray --replicas 1", ["--replicas", "1"])):
            proc, url = start(model, *engine, *extra, log=work / f"overhead-{name[:5]}-{r}.log")
            try:
                for concurrency, prompts in ((1, 8), (16, 64)):
                    s = bench(url, work / "overhead.json", "--dataset", "random", "--input-len", "256",
                              "--output-len", "64", "--ignore-eos", "--num-prompts", str(prompts),
                              "--max-concurrency", str(concurrency), "--temperature", "0")
                    rows.append({"round": r, "server": name, "threads": threads or "all", "concurrency": concurrency,
                                 "output_tok_s": s["output_throughput"], "ttft_ms": s["ttft_ms"]["median"],
                                 "tpot_ms": s["tpot_ms"]["median"], "failed": s["failed"]})
                    print(rows[-1], flush=True)
            finally:
                stop(proc)
    return rows


def routing(model: str | None, engine: list[str], kv_memory: str, work: Path) -> list[dict]:
    rows = []
    for policy in ("prefix", "round-robin"):
        proc, url = start(model, *engine, "--replicas", "2", "--threads", "1", "--routing", policy,
                          "--kv-cache-memory", kv_memory, log=work / f"routing-{policy}.log")
        try:
            before = prefix_counts(url)
            s = bench(url, work / "routing.json", "--dataset", "shared-prefix", "--num-prefixes", "16",
                      "--prefix-len", "256", "--output-len", "16", "--num-prompts", "160", "--max-concurrency", "8",
                      "--temperature", "0", "--seed", "1")
            after = prefix_counts(url)
            queries, hits = after[0] - before[0], after[1] - before[1]
            rows.append({"routing": policy, "kv_cache_memory": kv_memory, "hit_rate": hits / queries,
                         "ttft_ms": s["ttft_ms"]["median"], "ttft_p90_ms": s["ttft_ms"]["p90"],
                         "output_tok_s": s["output_throughput"], "failed": s["failed"]})
            print(rows[-1], flush=True)
        finally:
            stop(proc)
    return rows


def cache_hits(model: str | None, engine: list[str], work: Path, requests: int = 200) -> list[dict]:
    stores = ["memory"]
    redis = None
    if shutil.which("redis-server"):
        port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        stores.append(f"redis://127.0.0.1:{port}/0")
    rows = []
    try:
        for store in stores:
            proc, url = start(model, *engine, "--result-cache", store, log=work / "cache.log")
            try:
                body = {"prompt": "Write a haiku about the sea.", "max_tokens": 32, "temperature": 0}
                with httpx.Client(timeout=60) as client:
                    t0 = time.perf_counter()
                    client.post(f"{url}/v1/completions", json=body)
                    miss_ms = (time.perf_counter() - t0) * 1000
                    times = []
                    for _ in range(requests):
                        t0 = time.perf_counter()
                        assert client.post(f"{url}/v1/completions", json=body).status_code == 200
                        times.append((time.perf_counter() - t0) * 1000)
                times.sort()
                rows.append({"store": store.split(":")[0], "miss_ms": miss_ms,
                             "hit_median_ms": statistics.median(times),
                             "hit_p99_ms": times[int(0.99 * len(times)) - 1]})
                print(rows[-1], flush=True)
            finally:
                stop(proc)
    finally:
        if redis is not None:
            redis.kill()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-memory", default="64MiB",
                        help="per replica, for the routing runs: about half of the 16 tenants' prefixes")
    parser.add_argument("--parts", nargs="+", default=["overhead", "routing", "cache"])
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads in the overhead runs (default: all cores); 1 on a 2-core machine leaves "
                             "Ray's processes a core of their own")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = ["--kv-cache-memory", "512MiB"]
    path = args.out / "results.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"machine": describe(), "model": args.model or "default"})
    if "cache" in args.parts:
        result["cache"] = cache_hits(args.model, engine, args.out)
    if "routing" in args.parts:
        result["routing"] = routing(args.model, [], args.kv_cache_memory, args.out)
    if "overhead" in args.parts:
        key = "overhead" if args.threads is None else f"overhead_threads_{args.threads}"
        result[key] = overhead(args.model, engine, args.rounds, args.out, args.threads)
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
