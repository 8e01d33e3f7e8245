"""Peers and `bench compare`: server processes started and stopped cleanly, a missing llama.cpp said plainly,
and the ratio table computed right. No model server is started here."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from tokenmill.bench import BenchError, peers
from tokenmill.bench.compare import CompareConfig, markdown
from tokenmill.bench.datasets import DatasetConfig
from tokenmill.bench.metrics import RequestRecord, compute_metrics
from tokenmill.bench.peers import ServerProcess, find_llama_server, free_port
from tokenmill.bench.report import result_document

HEALTHY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers(); self.wfile.write(b"{}")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_process_waits_for_health_and_stops(tmp_path):
    port = free_port()
    server = ServerProcess("fake", [sys.executable, "-c", HEALTHY, str(port)], port, tmp_path / "fake.log")
    with server:
        server.start(timeout_s=60)
        assert server.process.poll() is None and server.base_url == f"http://127.0.0.1:{port}"
    assert server.process.poll() is not None  # stopped on leaving the block


def test_server_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('model file is corrupt'); sys.exit(3)"]
    server = ServerProcess("broken", command, free_port(), tmp_path / "broken.log")
    with pytest.raises(BenchError, match=r"(?s)broken exited with code 3 while starting.*model file is corrupt"):
        server.start(timeout_s=60)


def test_missing_llama_server_is_said_clearly(monkeypatch, tmp_path):
    monkeypatch.delenv(peers.LLAMA_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(peers, "SHARED_LLAMA_SERVER", tmp_path / "nowhere" / "llama-server")
    with pytest.raises(BenchError, match="llama-server binary was not found .*--llama-server PATH"):
        find_llama_server()
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_llama_server() == fake  # found on PATH
    with pytest.raises(BenchError, match="no-such-binary"):  # a path given is the only one tried
        find_llama_server(str(tmp_path / "no-such-binary"))


def test_project_llama_server_is_found_where_shared_keeps_it(monkeypatch):
    if not peers.SHARED_LLAMA_SERVER.is_file():
        pytest.skip(f"no llama.cpp peer binary at {peers.SHARED_LLAMA_SERVER}")
    monkeypatch.delenv(peers.LLAMA_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_llama_server() == peers.SHARED_LLAMA_SERVER


def test_compare_cli_with_missing_binary_fails_before_starting_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "compare", "--llama-server",
                           str(tmp_path / "missing"), "--dataset", "builtin", "--num-prompts", "2", "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={"PATH": str(tmp_path), "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: llama.cpp's llama-server binary was not found")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def serve_doc(output_s: float, ttft_s: float, failed: int = 0) -> dict:
    """Four 4-token requests over 2 s, each with the given TTFT and end-to-end time."""
    records = [RequestRecord(i, 4, chunk_times=[ttft_s, ttft_s + 0.1, ttft_s + 0.2, output_s], latency=output_s,
                             prompt_tokens=8, completion_tokens=4, success=True) for i in range(4)]
    records += [RequestRecord(4 + i, 4, error="HTTP 500: x") for i in range(failed)]
    return result_document("serve", {"label": "x"}, asdict(compute_metrics(records, 2.0)))


def test_markdown_ratios_are_tokenmill_over_peer():
    config = CompareConfig(dataset=DatasetConfig("builtin", 4), concurrencies=[1, 4], peers=["tokenmill", "llama.cpp"],
                           gguf=Path("model.gguf"), output_dir=Path("out"))
    results = {("tokenmill", 1): serve_doc(1.0, 0.2), ("llama.cpp", 1): serve_doc(1.0, 0.1),
               ("tokenmill", 4): serve_doc(1.0, 0.3, failed=1)}  # llama.cpp at 4: not run
    text = markdown(config, results)
    assert "| metric | tokenmill | llama.cpp | tokenmill / llama.cpp |" in text
    c1, c4 = text.split("## Concurrency 1")[1].split("## Concurrency 4")
    assert "| Output token throughput (tok/s) | 8.00 | 8.00 | 1.00x |" in c1  # 16 tokens / 2 s each
    assert "| Median TTFT (ms) | 200.00 | 100.00 | 2.00x |" in c1
    assert "| requests | 4 ok / 0 failed, 16 tokens out | 4 ok / 0 failed, 16 tokens out |  |" in c1
    assert "| requests | 4 ok / 1 failed, 16 tokens out | not run |  |" in c4
    assert "| Median TTFT (ms) | 300.00 | n/a | n/a |" in c4
    assert "above 1 is better for throughput, below 1 is better for latency" in text
