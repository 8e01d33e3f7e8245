"""Engine failures through real HTTP: uvicorn in a thread of this process, so a test can break the engine on purpose.

A failed step is a 500 (or an error event once streaming) and the next request is served; a dead engine loop
turns /health red and every generation into a 500, while the server itself stays up.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server import build_app

from serverproc import free_port


@pytest.fixture
def app_server(llm_f32) -> Iterator[tuple[str, AsyncEngine]]:
    async_engine = AsyncEngine(llm_f32.engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(async_engine, "m"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", async_engine
    finally:
        server.should_exit = True
        thread.join(30)
        async_engine.shutdown()  # the app's lifespan did it already; a no-op then


def _fail_from_step(engine, monkeypatch, first_failing: int) -> None:
    real_step, calls = engine.step, [0]

    def step():
        calls[0] += 1
        if calls[0] >= first_failing:
            raise RuntimeError("injected step failure")
        return real_step()

    monkeypatch.setattr(engine, "step", step)


def test_failed_step_is_500_and_the_server_goes_on(app_server, llm_f32, monkeypatch):
    url, _ = app_server
    _fail_from_step(llm_f32.engine, monkeypatch, first_failing=1)
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "InternalServerError" and "injected step failure" in error["message"]
    monkeypatch.undo()
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{url}/health").status_code == 200


def test_failure_mid_stream_is_an_error_event_then_done(app_server, llm_f32, monkeypatch):
    url, _ = app_server
    _fail_from_step(llm_f32.engine, monkeypatch, first_failing=4)
    body = {"prompt": "Once upon a time", "max_tokens": 50, "ignore_eos": True, "stream": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "injected step failure" in error["message"]
    assert any(json.loads(e).get("choices") for e in events[:-2])  # tokens came before the failure


def test_dead_engine_loop_turns_health_red_but_the_server_answers(app_server, llm_f32, monkeypatch):
    url, async_engine = app_server

    def broken() -> bool:
        raise RuntimeError("loop broke")

    monkeypatch.setattr(llm_f32.engine, "has_unfinished", broken)
    deadline = time.monotonic() + 5
    while async_engine.is_alive:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == 503
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert response.status_code == 500 and "not running" in response.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 200
