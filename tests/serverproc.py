"""Start and stop a real `tokenmill serve` process on 127.0.0.1 and read its /metrics and log."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.bench.peers import free_port

MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self, **headers: str) -> dict[str, float]:
        """Every sample as 'name{label="v",...}' -> value (model_name label left out)."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples


def start_server(tmp_dir: Path, *extra: str) -> Server:
    port, log_path = free_port(), tmp_dir / "serve.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), "--dtype", "float32",
             "--kv-cache-memory", "512MiB", *extra],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


def wait_healthy(server: Server, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"tokenmill serve exited early:\n{server.log()[-3000:]}"
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"tokenmill serve was not healthy within {timeout} s:\n{server.log()[-3000:]}")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
