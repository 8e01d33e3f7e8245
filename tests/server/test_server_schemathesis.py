"""schemathesis against a live `tokenmill serve` (issue 17): bounded examples from /openapi.json, 0 server errors,
and every response conforms to the document (status codes, content types, bodies, headers).

The server runs with a short context and small n / prompt limits, so no generated request can run long; the
examples are few and the seed fixed, so the run is bounded (about a minute on 2 cores) and repeatable.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from serverproc import start_server, stop, wait_healthy

pytest.importorskip("schemathesis")

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance")
MAX_EXAMPLES = 10
RUN_TIMEOUT = 240  # the run itself takes ~40-70 s; this only stops a hang


def test_schemathesis_finds_no_server_error_and_no_nonconformance(tmp_path):
    server = start_server(tmp_path, "--max-model-len", "128", "--max-n", "2", "--max-prompts", "2")
    try:
        wait_healthy(server)
        command = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "-c", CHECKS,
                   "-n", str(MAX_EXAMPLES), "--seed", "1", "--phases", "examples,coverage,fuzzing", "--no-color",
                   "--request-timeout", "60", "--workers", "1", "--suppress-health-check", "all"]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tmp_path,
                                 check=False)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            pytest.fail(f"schemathesis ran past {RUN_TIMEOUT} s:\n{out[-6000:]}\nserver log:\n{server.log()[-3000:]}")
        output = run.stdout + run.stderr
        print(output[-3000:])  # the summary, shown with -s
        assert run.returncode == 0, f"schemathesis exit {run.returncode}:\n{output[-8000:]}"
        assert server.proc.poll() is None, f"the server died during the run:\n{server.log()[-3000:]}"
        log = server.log()
        assert "Traceback" not in log, log[-6000:]
    finally:
        stop(server)
