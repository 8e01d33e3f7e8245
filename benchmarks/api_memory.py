"""Memory of `tokenmill serve`'s two processes (the API process and its engine core), after one request.

PSS (proportional set size) splits each shared page between the processes that map it, so the two PSS add up
to what the server really costs; RSS counts shared pages in both. Usage:
    python benchmarks/api_memory.py [MODEL] [--label NAME]   (run from the tree to measure; PYTHONPATH=other/src
    measures another checkout with the same venv)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tokenmill.bench.peers import ServerProcess, free_port


def rollup(pid: int) -> dict[str, float]:
    """RSS and PSS of one process in MiB, from /proc/PID/smaps_rollup."""
    text = open(f"/proc/{pid}/smaps_rollup").read()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for key in ("Rss", "Pss")}


def measure(model: str | None) -> dict[str, dict[str, float]]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "tokenmill.cli", "serve", *([model] if model else []), "--port", str(port)]
        with ServerProcess("tokenmill", command, port, Path(tmp) / "serve.log") as server:
            server.start(timeout_s=300)
            httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=120)
            time.sleep(1)
            core = int(re.search(r"engine core running in process (\d+)", server.log_tail(10**6)).group(1))
            return {"api": rollup(server.process.pid), "core": rollup(core)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    result = measure(args.model)
    print(json.dumps({"label": args.label, "model": args.model or "default", **result}))


if __name__ == "__main__":
    main()
