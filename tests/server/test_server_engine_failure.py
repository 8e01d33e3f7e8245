"""Engine failures through real HTTP: uvicorn in a thread of this process, so a test can break the engine on purpose.

The step loop runs in a forked engine core process, so a fault is patched into the LLMEngine *before* the
AsyncEngine starts (the child inherits it) and fires only for prompts carrying a marker: requests without it
show the server going on. A failed step is a 500 (or an error event once streaming) and the next request is
served; a dead engine loop or a killed core process turns /health red and every generation into a 503, while
the server itself stays up (these tests set no on_dead hook; `tokenmill serve` exits instead: test_server_faults.py).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from serverproc import free_port
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.engine import LLMEngine
from tokenmill.server import ModelRegistry, ServerState, build_app

MARK = "Xylophone-fault"


@contextmanager
def app_server(engine: LLMEngine) -> Iterator[tuple[str, AsyncEngine]]:
    async_engine = AsyncEngine.of_engine(engine)
    port = free_port()
    app = build_app(ModelRegistry([ServerState.create(async_engine, "m")]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
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


def _marked(engine: LLMEngine, min_output_tokens: int) -> bool:
    """A running request's prompt has MARK and it has generated at least `min_output_tokens` tokens."""
    return any(MARK in engine.tokenizer.decode(p.prompt_token_ids) and
               len(p.children[0].output_ids) >= min_output_tokens for p in engine.parents.values())


def _fail_steps(engine: LLMEngine, monkeypatch, after_tokens: int) -> None:
    real_step = engine.step

    def step():
        if _marked(engine, after_tokens):
            raise RuntimeError("injected step failure")
        return real_step()

    monkeypatch.setattr(engine, "step", step)


def _post(url: str, prompt: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4, **body}, timeout=60)


def test_failed_step_is_500_and_the_server_goes_on(llm_f32, monkeypatch):
    _fail_steps(llm_f32.engine, monkeypatch, after_tokens=0)
    with app_server(llm_f32.engine) as (url, _):
        response = _post(url, f"Hi {MARK}")
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "InternalServerError" and "injected step failure" in error["message"]
        ok = _post(url, "Hi")
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{url}/health").status_code == 200


def test_failure_mid_stream_is_an_error_event_then_done(llm_f32, monkeypatch):
    _fail_steps(llm_f32.engine, monkeypatch, after_tokens=3)
    with app_server(llm_f32.engine) as (url, _):
        response = _post(url, f"Once upon a time {MARK}", max_tokens=50, ignore_eos=True, stream=True)
        assert response.status_code == 200
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 500 and "injected step failure" in error["message"]
        assert any(json.loads(e).get("choices") for e in events[:-2])  # tokens came before the failure
        assert _post(url, "Hi").status_code == 200


def _check_dead_but_answering(url: str, async_engine: AsyncEngine) -> None:
    deadline = time.monotonic() + 10
    while async_engine.is_alive:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == 503
    response = _post(url, "Hi", max_tokens=2)
    assert response.status_code == 503 and "not running" in response.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 200


def test_dead_engine_loop_turns_health_red_but_the_server_answers(llm_f32, monkeypatch):
    engine = llm_f32.engine
    real = engine.has_unfinished

    def broken() -> bool:
        if _marked(engine, 0):
            raise RuntimeError("loop broke")
        return real()

    monkeypatch.setattr(engine, "has_unfinished", broken)
    with app_server(engine) as (url, async_engine):
        assert _post(url, "Hi").status_code == 200
        response = _post(url, f"Hi {MARK}")
        assert response.status_code == 503 and "loop broke" in response.json()["error"]["message"]
        _check_dead_but_answering(url, async_engine)


def test_killed_engine_core_ends_streams_and_turns_health_red(llm_f32):
    """The core process killed (say, by the OOM killer) mid-stream: the stream ends with an error event."""
    with app_server(llm_f32.engine) as (url, async_engine):
        body = {"prompt": "Tell me a story", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 4:
                    os.kill(async_engine.core_pid, signal.SIGKILL)
        events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "engine core process exited" in error["message"]
        _check_dead_but_answering(url, async_engine)
