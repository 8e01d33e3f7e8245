"""Servers to benchmark, as processes we start on loopback, wait for (/health) and stop.

The llama.cpp peer is llama.cpp's own `llama-server` (parallel slots + continuous batching), serving the same
GGUF. llama-cpp-python's server answers one request at a time, so it is not a fair concurrency peer.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokenmill.bench import BenchError

HOST = "127.0.0.1"
LLAMA_SERVER_ENV = "TOKENMILL_LLAMA_SERVER"
# Where the project keeps the peer binaries: shared/ beside the repository (this file is src/tokenmill/bench/).
SHARED_LLAMA_SERVER = Path(__file__).resolve().parents[4] / "shared" / "peers" / "llama.cpp" / "bin" / "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A server subprocess; its output goes to log_path, which error messages quote."""

    name: str
    command: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll /health until it answers 200; fail early if the process dies, with its log's tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.process.returncode} while starting; "
                                 f"command: {' '.join(self.command)}\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise BenchError(f"{self.name} did not become healthy within {timeout_s:.0f} s\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_llama_server(explicit: str | None = None) -> Path:
    """--llama-server or else $TOKENMILL_LLAMA_SERVER if given (then only that); else PATH, then shared/'s copy."""
    chosen = explicit or os.environ.get(LLAMA_SERVER_ENV)
    candidates = [chosen] if chosen else [shutil.which("llama-server"), str(SHARED_LLAMA_SERVER)]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    looked = chosen or f"PATH, {SHARED_LLAMA_SERVER}"
    raise BenchError(f"llama.cpp's llama-server binary was not found (looked at: {looked}); pass --llama-server "
                     "PATH, or leave llama.cpp out with --peers tokenmill")


def llama_server(binary: Path, gguf: Path, parallel: int, ctx_per_slot: int, threads: int, port: int,
                 log_path: Path) -> ServerProcess:
    """`--parallel` slots, each with ctx_per_slot tokens of context (-c is the total, split across slots)."""
    command = [str(binary), "-m", str(gguf), "-t", str(threads), "--parallel", str(parallel),
               "-c", str(ctx_per_slot * parallel), "--cont-batching", "--host", HOST, "--port", str(port)]
    return ServerProcess("llama.cpp", command, port, log_path)


def tokenmill_server(model: Path, dtype: str, kv_cache_memory: int, port: int, log_path: Path) -> ServerProcess:
    command = [sys.executable, "-m", "tokenmill.cli", "serve", str(model), "--host", HOST, "--port", str(port),
               "--dtype", dtype, "--kv-cache-memory", str(kv_cache_memory)]
    return ServerProcess("tokenmill", command, port, log_path)
