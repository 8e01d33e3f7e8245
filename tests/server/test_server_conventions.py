"""Conventions `vllm serve` and `llama-server` users reach for: GET /version, CORS with --allowed-origins (a
browser's preflight is answered; without the flag no origin is allowed), and OpenAI's `developer` role."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from serverproc import Server, start_server, stop, wait_healthy

ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("cors"), "--allowed-origins", ORIGIN)
    try:
        wait_healthy(srv)
        yield srv
    finally:
        stop(srv)


def test_version(server):
    response = httpx.get(f"{server.url}/version")
    assert response.status_code == 200 and response.json()["version"]


def test_preflight_answered_only_for_allowed_origins(server, cors_server):
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "content-type,authorization"}
    allowed = httpx.options(f"{cors_server.url}/v1/chat/completions", headers=headers)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{cors_server.url}/v1/chat/completions", headers={**headers, "Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers
    plain = httpx.options(f"{server.url}/v1/chat/completions", headers=headers)  # no --allowed-origins
    assert "access-control-allow-origin" not in plain.headers
    response = httpx.post(f"{cors_server.url}/v1/completions", headers={"Origin": ORIGIN},
                          json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN


def test_developer_role_is_the_system_prompt(server):
    def prompt(role: str) -> list[int]:
        body = {"messages": [{"role": role, "content": "Answer in French."}, {"role": "user", "content": "Hi"}]}
        return httpx.post(f"{server.url}/tokenize", json=body).json()["tokens"]

    assert prompt("developer") == prompt("system")
