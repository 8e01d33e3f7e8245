"""Memory of `tokenmill serve`'s two processes (the API process and its engine core), after one request.

PSS (proportional set size) splits each shared page between the processes that map it, so the two PSS add up
to what the server really costs; RSS counts shared pages in both. Usage:
    python benchmarks/api_memory.py [MODEL] [--label NAME]   (run from the tree to measure; PYTHONPATH=other/src
    measures another checkout with the same venv)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import httpx

from tokenmill.bench.peers import free_port


def rollup(pid: int) -> dict[str, float]:
    """RSS and PSS of one process in MiB, from /proc/PID/smaps_rollup."""
    text = open(f"/proc/{pid}/smaps_rollup").read()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for key in ("Rss", "Pss")}


def measure(model: str | None) -> dict[str, dict[str, float]]:
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        cmd = [sys.executable, "-m", "tokenmill.cli", "serve", *([model] if model else []), "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, open(log.name).read()[-2000:]
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=120)
            time.sleep(1)
            core = int(re.search(r"engine core running in process (\d+)", open(log.name).read()).group(1))
            return {"api": rollup(proc.pid), "core": rollup(core)}
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    result = measure(args.model)
    print(json.dumps({"label": args.label, "model": args.model or "default", **result}))


if __name__ == "__main__":
    main()
