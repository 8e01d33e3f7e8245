"""`tokenmill serve` options that fail before anything loads, an engine that fails to start, the default served
model name, and what the API process imports."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serverproc import start_server, stop, wait_healthy
from tokenmill.bench.peers import free_port
from tokenmill.server.launch import short_model_name


@pytest.mark.parametrize("path,name", [
    ("/m/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("/m/llama-3-8b-instruct-q4_k_m.gguf", "llama-3-8b-instruct"),
    ("/m/qwen2-0.5b-instruct-IQ4_XS.gguf", "qwen2-0.5b-instruct"),
    ("/m/tiny-f16.gguf", "tiny"),
    ("/m/tiny.gguf", "tiny"),
    ("/models/SmolLM2-360M-Instruct", "SmolLM2-360M-Instruct"),
])
def test_short_model_name(path, name):
    assert short_model_name(Path(path)) == name


@pytest.mark.parametrize("args,message", [
    (["--max-waiting", "0"], "--max-waiting must be >= 1"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0"),
    (["a.gguf", "--model", "b.gguf"], "model given twice"),
    (["a.gguf", "b.gguf", "--model", "a.gguf"], "model given twice"),
    (["a.gguf", "b.gguf", "--served-model-name", "x"], "--served-model-name given 1 times for 2 models"),
    (["--ray-address", "auto"], "--ray-address: needs --replicas N"),
    (["--routing", "round-robin", "--min-replicas", "1"], "--min-replicas, --routing: needs --replicas N"),
    (["a.gguf", "b.gguf", "--replicas", "2"], "--replicas serves one model"),
    (["--replicas", "2", "--min-replicas", "1"], "give --min-replicas and --max-replicas together"),
    (["--result-cache", "memcached://x"], "--result-cache must be 'memory' or a Redis URL"),
    (["--result-cache", "memory", "--result-cache-ttl", "0"], "--result-cache-ttl must be > 0"),
    (["--result-cache", "memory", "--result-cache-max-entries", "0"], "--result-cache-max-entries must be >= 1"),
])
def test_bad_serve_option_is_a_clean_error_before_loading(args, message):
    proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", "serve", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plain_serve_never_imports_ray():
    """Ray is for --replicas only: a plain server's modules must not pull it in (seconds of import, a cluster)."""
    code = ("import sys, tokenmill.cli, tokenmill.cli_serve, tokenmill.server.launch, tokenmill.server.app; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_engine_start_failure_is_a_clean_error():
    """The engine core builds and starts its engine in its own process; what stops it there (here: its KV event
    port is taken) reaches the command as the same clean error, not a server that never gets healthy."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{port}"})
        proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(free_port()),
                               "--kv-events-config", config], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: kv_events_config: cannot open tcp://127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_api_process_never_loads_torch(tmp_path):
    """The API process tokenizes, validates and formats; torch (and the model) are the engine core's. Checked in
    the processes' memory maps after serving each kind of request, so a lazy import on a request path counts too."""
    server = start_server(tmp_path)
    try:
        wait_healthy(server)
        for path, body in [("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "logprobs": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                     "response_format": {"type": "json_object"}}),
                           ("/v1/embeddings", {"input": "Hello"})]:
            assert httpx.post(server.url + path, json=body, timeout=120).status_code == 200
        assert httpx.get(server.url + "/metrics", timeout=30).status_code == 200
        core_pid = int(re.search(r"engine core running in process (\d+)", server.log()).group(1))
        assert "libtorch" in Path(f"/proc/{core_pid}/maps").read_text()
        assert "libtorch" not in Path(f"/proc/{server.proc.pid}/maps").read_text()
    finally:
        stop(server)
