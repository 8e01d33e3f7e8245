"""Peers and `bench compare`: server processes started and stopped cleanly (their leftover children too), a
missing peer said plainly with how to set it up, vLLM started through the project's own serve.sh, transformers
given a KV budget, and the ratio table computed right. No model server is started here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from tokenmill.bench import BenchError, peers
from tokenmill.bench.compare import CompareConfig, locate_peers, markdown, requests_for
from tokenmill.bench.datasets import DatasetConfig, SampleRequest
from tokenmill.bench.metrics import RequestRecord, compute_metrics
from tokenmill.bench.peers import (
    ServerProcess,
    find_hf_model,
    find_llama_server,
    find_vllm,
    free_port,
    transformers_cb_blocks,
    transformers_server,
    vllm_server,
)
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


def serve_doc(output_s: float, ttft_s: float, failed: int = 0, tokens: int = 4) -> dict:
    """Four `tokens`-token requests over 2 s, each with the given TTFT and end-to-end time."""
    records = [RequestRecord(i, 4, chunk_times=[ttft_s, ttft_s + 0.1, ttft_s + 0.2, output_s], latency=output_s,
                             prompt_tokens=8, completion_tokens=tokens, success=True) for i in range(4)]
    records += [RequestRecord(4 + i, 4, error="HTTP 500: x") for i in range(failed)]
    return result_document("serve", {"label": "x"}, asdict(compute_metrics(records, 2.0)))


def test_markdown_ratios_are_tokenmill_over_peer():
    config = CompareConfig(dataset=DatasetConfig("builtin", 4), concurrencies=[1, 4], peers=["tokenmill", "llama.cpp"],
                           gguf=Path("model.gguf"), output_dir=Path("out"))
    results = {("tokenmill", 1): serve_doc(1.0, 0.2), ("llama.cpp", 1): serve_doc(1.0, 0.1),
               ("tokenmill", 4): serve_doc(1.0, 0.3, failed=1)}  # llama.cpp at 4: not run
    text = markdown(config, results)
    assert "| metric | tokenmill | llama.cpp | tokenmill / llama.cpp |" in text
    assert "**The servers generated different numbers of tokens here**" not in text
    c1, c4 = text.split("## Concurrency 1")[1].split("## Concurrency 4")
    assert "| Output token throughput (tok/s) | 8.00 | 8.00 | 1.00x |" in c1  # 16 tokens / 2 s each
    assert "| Median TTFT (ms) | 200.00 | 100.00 | 2.00x |" in c1
    assert "| requests | 4 ok / 0 failed, 16 tokens out | 4 ok / 0 failed, 16 tokens out |  |" in c1
    assert "| requests | 4 ok / 1 failed, 16 tokens out | not run |  |" in c4
    assert "| Median TTFT (ms) | 300.00 | n/a | n/a |" in c4
    assert "above 1 is better for throughput, below 1 is better for latency" in text


def test_markdown_covers_every_peer_and_flags_unequal_work():
    names = ["tokenmill", "llama.cpp", "vllm", "transformers"]
    config = CompareConfig(dataset=DatasetConfig("shared-prefix", 24), concurrencies=[64], peers=names,
                           gguf=Path("model.gguf"), output_dir=Path("out"))
    results = {(p, 64): serve_doc(1.0, 0.2, tokens=3 if p == "transformers" else 4) | {"server_command": [p, "-x"]}
               for p in names}
    results["vllm", 64]["server_env"] = {"PORT": "1234"}
    text = markdown(config, results)
    assert "| metric | tokenmill | llama.cpp | vllm | transformers | tokenmill / llama.cpp | tokenmill / vllm | " \
           "tokenmill / transformers |" in text
    assert "| Output token throughput (tok/s) | 8.00 | 8.00 | 8.00 | 6.00 | 1.00x | 1.00x | 1.33x |" in text
    assert "- transformers server: `transformers -x`" in text and "- vllm server: `PORT=1234 vllm -x`" in text
    assert "max(24, 2 x C) requests" in text
    assert "**The servers generated different numbers of tokens here**" in text  # 12 tokens vs 16


def test_each_run_sends_at_least_min_rounds_times_c_requests():
    requests = [SampleRequest(f"p{i}", 4) for i in range(128)]
    config = CompareConfig(dataset=DatasetConfig("builtin", 24), concurrencies=[1, 64], peers=["tokenmill"],
                           gguf=Path("m.gguf"), output_dir=Path("o"), min_rounds=2)
    assert requests_for(requests, config, 1) == requests[:24]  # --num-prompts when larger
    assert requests_for(requests, config, 64) == requests  # 2 x 64, so 64 stay in flight until the last round


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_missing_vllm_setup_names_setup_sh(monkeypatch, tmp_path):
    monkeypatch.delenv(peers.VLLM_VENV_ENV, raising=False)
    monkeypatch.setattr(peers, "DEFAULT_VLLM_VENV", tmp_path / "no-venv")
    monkeypatch.setattr(peers, "VLLM_DIR", tmp_path / "vllm-cpu")
    with pytest.raises(BenchError, match="serve.sh"):  # the project's scripts are missing
        find_vllm()
    _executable(tmp_path / "vllm-cpu" / "serve.sh", "")
    with pytest.raises(BenchError, match=rf"not set up \(no {tmp_path}/no-venv/bin/vllm\): run `bash .*setup\.sh`"):
        find_vllm()
    venv = tmp_path / "venv"
    _executable(venv / "bin" / "vllm", "#!/bin/sh\n")
    assert find_vllm(str(venv)) == venv
    monkeypatch.setenv(peers.VLLM_VENV_ENV, str(venv))
    assert find_vllm() == venv


def test_hf_copy_is_required_for_other_models_and_named_when_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "DEFAULT_HF_MODEL", tmp_path / "smollm2-hf")
    with pytest.raises(BenchError, match="pass --hf-model DIR holding the same model"):
        find_hf_model(None, default_model=False)
    with pytest.raises(BenchError, match=r"no HF model directory at .*smollm2-hf .*setup\.sh` writes it"):
        find_hf_model(None, default_model=True)
    (tmp_path / "smollm2-hf").mkdir()
    (tmp_path / "smollm2-hf" / "config.json").write_text("{}")
    assert find_hf_model(None, default_model=True) == tmp_path / "smollm2-hf"
    with pytest.raises(BenchError, match="no HF model directory at /nowhere"):
        find_hf_model("/nowhere", default_model=True)


def test_locate_peers_lists_every_missing_piece_at_once(monkeypatch, tmp_path):
    monkeypatch.delenv(peers.LLAMA_SERVER_ENV, raising=False)
    monkeypatch.delenv(peers.VLLM_VENV_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(peers, "SHARED_LLAMA_SERVER", tmp_path / "nowhere" / "llama-server")
    monkeypatch.setattr(peers, "DEFAULT_VLLM_VENV", tmp_path / "no-venv")
    monkeypatch.setattr(peers, "DEFAULT_HF_MODEL", tmp_path / "no-hf")
    vllm_dir = tmp_path / "vllm-cpu"  # the project's scripts present (as next to any clone in ../shared), venv not
    vllm_dir.mkdir()
    (vllm_dir / "serve.sh").write_text("")
    monkeypatch.setattr(peers, "VLLM_DIR", vllm_dir)
    config = CompareConfig(dataset=DatasetConfig("builtin", 4), concurrencies=[1], gguf=Path("m.gguf"),
                           output_dir=tmp_path, peers=["tokenmill", "llama.cpp", "vllm", "transformers"])
    with pytest.raises(BenchError) as info:
        locate_peers(config)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and "llama-server binary was not found" in lines[0]
    assert "vLLM's CPU peer is not set up" in lines[1] and "no HF model directory" in lines[2]
    located = locate_peers(CompareConfig(dataset=config.dataset, concurrencies=[1], gguf=Path("m.gguf"),
                                         output_dir=tmp_path, peers=["tokenmill"], dtype="float32"))
    assert located.dtype == "float32" and located.llama_server is located.vllm_venv is located.hf_model is None
    with pytest.raises(BenchError, match="--peers takes some of"):
        locate_peers(CompareConfig(dataset=config.dataset, concurrencies=[1], gguf=Path("m.gguf"),
                                   output_dir=tmp_path, peers=["sglang"]))


FAKE_VLLM = f"""#!{sys.executable}
# Stands in for the venv's `vllm`: records how serve.sh called it, then serves /health on --port.
import http.server, json, os, sys
args = sys.argv[1:]
json.dump({{"args": args, "kv": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "offline": os.environ.get("HF_HUB_OFFLINE")}},
          open(os.environ["FAKE_VLLM_RECORD"], "w"))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), H).serve_forever()
"""


def test_vllm_peer_starts_through_the_projects_serve_sh(monkeypatch, tmp_path):
    if not (peers.VLLM_DIR / "serve.sh").is_file():
        pytest.skip(f"no vLLM peer scripts at {peers.VLLM_DIR}")
    venv = tmp_path / "venv"
    _executable(venv / "bin" / "vllm", FAKE_VLLM)
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    port = free_port()
    server = vllm_server(venv, Path("/models/hf"), "bfloat16", 3 << 30, port, tmp_path / "vllm.log")
    assert server.backend == "openai"
    with server:
        server.start(timeout_s=60)  # serve.sh found our venv and passed our port on
    seen = json.loads(record.read_text())
    assert seen["args"][:2] == ["serve", "/models/hf"]
    assert seen["args"][seen["args"].index("--dtype") + 1] == "bfloat16"
    assert seen["args"][seen["args"].index("--host") + 1] == "127.0.0.1"
    assert seen["kv"] == "3" and seen["offline"] == "1"


def test_transformers_peer_gets_the_same_kv_budget_and_its_own_dialect(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9,
                                                      "num_key_value_heads": 3, "hidden_size": 576}))
    # SmolLM2-135M: 30 layers x (K and V) x 3 heads x 64 dims x 2 bytes = 23040 bytes per token in bf16
    assert transformers_cb_blocks(tmp_path, "bfloat16", 4 << 30) == (4 << 30) // (23040 * peers.CB_PAGE_SIZE)
    assert transformers_cb_blocks(tmp_path, "float32", 4 << 30) == (4 << 30) // (46080 * peers.CB_PAGE_SIZE)
    assert transformers_cb_blocks(tmp_path, "float32", 1) == 1
    server = transformers_server(tmp_path, "float32", 4 << 30, 1234, tmp_path / "t.log")
    assert server.backend == "transformers" and server.env["HF_HUB_OFFLINE"] == "1"
    command = server.command
    assert command[command.index("--cb-num-blocks") + 1] == "364" and "--continuous-batching" in command


LEAVES_A_CHILD = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[2], "w").write(str(child.pid))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_stop_also_ends_what_the_server_left_running(tmp_path):
    """vLLM's API server starts engine and worker processes; none may outlive the run and load the next one's CPU."""
    port, pid_file = free_port(), tmp_path / "child.pid"
    server = ServerProcess("parent", [sys.executable, "-c", LEAVES_A_CHILD, str(port), str(pid_file)], port,
                           tmp_path / "parent.log")
    with server:
        server.start(timeout_s=60)
        child = int(pid_file.read_text())
        os.kill(child, 0)  # alive while the server runs
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server's child process outlived stop()")
