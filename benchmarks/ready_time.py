"""Ready time and memory at ready: process start -> /health 200, then PSS, for `tokenmill serve` (with its
repacked-weight cache, and without it) and llama.cpp's `llama-server` on the same GGUF, interleaved.

"warm": the files are in the page cache (a run just before); "cold": the page cache is dropped first
(`echo 3 > /proc/sys/vm/drop_caches`, needs root), so the GGUF (and tokenmill's weight cache) come from disk.
    python benchmarks/ready_time.py [MODEL] [--rounds 3] [--cold]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tokenmill.bench.peers import HOST, find_llama_server, free_port, llama_server, tokenmill_server
from tokenmill.hardware import describe
from tokenmill.model.loader import load_checkpoint


def pss_mib(root: int) -> float:
    """PSS of a process and its descendants (tokenmill's engine core is a child), in MiB."""
    pids = [root]
    for pid in pids:
        try:
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            pass
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def ready(server, cold: bool) -> dict[str, float]:
    if cold:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    started = time.monotonic()
    server.process = subprocess.Popen(server.command, stdout=open(server.log_path, "wb"), stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            assert server.process.poll() is None, server.log_tail()
            try:
                if httpx.get(f"http://{HOST}:{server.port}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - started < 300, server.log_tail()
            time.sleep(0.02)
        seconds = time.monotonic() - started
        time.sleep(0.5)
        return {"ready_s": seconds, "pss_mib": pss_mib(server.process.pid)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()
    gguf = load_checkpoint(args.model).path
    logs = Path(tempfile.mkdtemp())
    kv = 1 << 30

    def variants():
        yield "tokenmill", tokenmill_server(gguf, "auto", kv, free_port(), logs / "tm.log")
        no_cache = tokenmill_server(gguf, "auto", kv, free_port(), logs / "tm-nc.log")
        no_cache.command.append("--no-weight-cache")
        yield "tokenmill --no-weight-cache", no_cache
        yield "llama-server", llama_server(find_llama_server(), gguf, 1, 4096, 2, free_port(), logs / "ls.log")

    results: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        for name, server in variants():
            results.setdefault(name, []).append(ready(server, args.cold))
            print(f"round {round_ + 1} {name}: {results[name][-1]}", file=sys.stderr)
    summary = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    print(json.dumps({"model": args.model, "cold": args.cold, "machine": describe(), "median": summary,
                      "runs": results}, indent=1))


if __name__ == "__main__":
    main()
