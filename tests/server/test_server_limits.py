"""API key, backpressure and graceful shutdown, on a server with --api-key, --max-num-seqs 1 and --max-waiting 1
(and --served-model-name, --log-prompts).

The tests run in file order: the last one sends SIGTERM to this module's server.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from serverproc import Server, start_server, stop, wait_healthy

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHUTDOWN_TIMEOUT = 2.0
MODEL_NAME = "smol"


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("limited"), "--api-key", KEY, "--max-num-seqs", "1",
                       "--max-waiting", "1", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
                       "--served-model-name", MODEL_NAME, "--log-prompts")
    try:
        wait_healthy(srv)
        yield srv
    finally:
        stop(srv)


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                         ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                                         ("POST", "/detokenize"), ("GET", "/v1/no-such-route")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(limited, method, path, headers):
    response = httpx.request(method, f"{limited.url}{path}", headers=headers, json={"prompt": "x"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "AuthenticationError"


def test_bearer_scheme_in_any_case_and_www_authenticate(limited):
    for scheme in ("bearer", "BEARER", "BeArEr"):
        r = httpx.get(f"{limited.url}/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, scheme
    refused = httpx.get(f"{limited.url}/v1/models", headers={"Authorization": f"Basic {KEY}"})
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_key_in_the_query_string_never_reaches_the_access_log(limited):
    httpx.get(f"{limited.url}/v1/models?api_key=sk-secret-in-url", headers=AUTH)
    log = limited.log()
    assert "GET /v1/models?... HTTP" in log and "sk-secret-in-url" not in log


def test_right_key_is_served_and_health_metrics_stay_open(limited):
    assert httpx.get(f"{limited.url}/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL_NAME
    client = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=KEY, max_retries=0)
    out = client.completions.create(model=MODEL_NAME, prompt="Hi there, log me", max_tokens=2)
    assert out.usage.completion_tokens >= 1
    assert f"request_id={out.id} " in limited.log() and "prompt='Hi there, log me'" in limited.log()  # --log-prompts
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{limited.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{limited.url}/health").status_code == 200
    metrics = limited.metrics()
    assert metrics['tokenmill:request_errors_total{status_code="401"}'] >= 18


def test_queue_full_is_429_with_retry_after(limited):
    """One request runs (max-num-seqs 1), one waits (max-waiting 1): the next ones are turned away."""
    body = {"model": MODEL_NAME, "prompt": "Go on:", "max_tokens": 48, "ignore_eos": True, "stream": True}
    results: dict[str, list[str]] = {}
    first_token = threading.Event()

    def stream(name: str) -> None:
        with httpx.stream("POST", f"{limited.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200
            results[name] = []
            for line in r.iter_lines():
                first_token.set()
                results[name].append(line)

    runner = threading.Thread(target=stream, args=("running",))
    runner.start()
    assert first_token.wait(30)
    waiter = threading.Thread(target=stream, args=("waiting",))
    waiter.start()
    deadline = time.monotonic() + 10
    while limited.metrics()["tokenmill:num_requests_waiting"] < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
    refused = [httpx.post(f"{limited.url}/v1/completions", json={**body, "stream": s}, headers=AUTH, timeout=60)
               for s in (False, True)]
    for response in refused:
        assert response.status_code == 429, response.text
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["type"] == "RateLimitError"
    runner.join(60)
    waiter.join(60)
    for name in ("running", "waiting"):
        finals = [json.loads(x[6:]) for x in results[name] if x.startswith("data: {")]
        assert results[name][-2:] == ["data: [DONE]", ""] or results[name][-1] == "data: [DONE]"
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
    # served again once the queue drained
    ok = httpx.post(f"{limited.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=AUTH, timeout=60)
    assert ok.status_code == 200
    assert limited.metrics()['tokenmill:request_errors_total{status_code="429"}'] == 2


def test_sigterm_drains_then_exits_zero(limited):
    """In-flight streams end cleanly (finish_reason "abort" once the timeout passes), and the process exits 0."""
    body = {"model": MODEL_NAME, "prompt": "Tell me everything.", "max_tokens": 4000, "ignore_eos": True,
            "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", f"{limited.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 6:
                sent = time.monotonic()
                limited.proc.send_signal(signal.SIGTERM)
    assert lines[-1] == "data: [DONE]" or lines[-2:] == ["data: [DONE]", ""]
    finals = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert finals[-1]["choices"][0]["finish_reason"] == "abort"
    assert limited.proc.wait(SHUTDOWN_TIMEOUT + 10) == 0
    assert time.monotonic() - sent < SHUTDOWN_TIMEOUT + 10
    log = limited.log()
    assert "aborted 1 requests still running" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{limited.url}/health")
    core_pid = int(re.search(r"engine core running in process (\d+)", log).group(1))
    with pytest.raises(ProcessLookupError):  # the engine core went with the server, not left behind
        os.kill(core_pid, 0)
