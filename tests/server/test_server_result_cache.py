"""The result cache of a real `tokenmill serve`: in-process (memory) and in a real redis-server.

A hit must be indistinguishable from the fresh answer (text, token ids' count in usage, finish reason, logprobs),
streamed or not; sampled requests without a seed never touch the cache; Redis going away costs nothing but the
cache.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from redisproc import redis_server
from serverproc import start_server, stop, wait_healthy
from tokenmill.server.result_cache import RETRY_AFTER, MemoryStore, RedisStore

CHAT = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 12, "temperature": 0}
COMPLETION = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 2}


def counts(server) -> tuple[float, float]:
    m = server.metrics()
    return m.get("tokenmill:result_cache_hits_total", 0.0), m.get("tokenmill:result_cache_misses_total", 0.0)


def post(server, path: str, body: dict, **headers: str) -> dict:
    r = httpx.post(f"{server.url}/v1/{path}", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(server, path: str, body: dict) -> list[dict]:
    r = httpx.post(f"{server.url}/v1/{path}", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                   timeout=60)
    assert r.status_code == 200, r.text
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def same_answer(a: dict, b: dict) -> None:
    """Equal but for the response's own id and creation time, and the prompt tokens the prefix cache held (when
    one of them ran)."""
    assert a["id"] != b["id"]
    for r in (a, b):
        r["usage"].pop("prompt_tokens_details", None)
    assert {**a, "id": None, "created": None} == {**b, "id": None, "created": None}


@pytest.fixture(scope="module")
def memory_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("result-cache"), "--result-cache", "memory")
    try:
        wait_healthy(srv)
        yield srv
    finally:
        stop(srv)


def test_hit_equals_the_fresh_answer_streamed_or_not(memory_server):
    hits, misses = counts(memory_server)
    first = post(memory_server, "completions", COMPLETION)
    second = post(memory_server, "completions", COMPLETION)
    same_answer(first, second)
    assert first["choices"][0]["logprobs"]["tokens"]  # logprobs come back from the cache too
    chunks = streamed(memory_server, "completions", COMPLETION)  # the non-streamed result, replayed as a stream
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == first["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == first["choices"][0][
        "finish_reason"]
    assert {**chunks[-1]["usage"], "prompt_tokens_details": None} == {**first["usage"], "prompt_tokens_details": None}
    assert counts(memory_server) == (hits + 2, misses + 1)


def test_chat_through_the_openai_client(memory_server):
    client = openai.OpenAI(base_url=f"{memory_server.url}/v1", api_key="unused", max_retries=0)
    hits, misses = counts(memory_server)
    kwargs = {"model": "SmolLM2-135M-Instruct", **CHAT}
    fresh = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True)
    replayed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    again = client.chat.completions.create(**kwargs)
    assert replayed == fresh.choices[0].message.content == again.choices[0].message.content
    assert again.usage == fresh.usage and again.choices[0].finish_reason == fresh.choices[0].finish_reason
    assert counts(memory_server) == (hits + 2, misses + 1)


def test_what_is_not_cached(memory_server):
    hits, misses = counts(memory_server)
    body = {**COMPLETION, "prompt": "Once upon a time", "temperature": 0.8}
    post(memory_server, "completions", body)
    post(memory_server, "completions", body)  # sampled, no seed: never looked up, never stored
    assert counts(memory_server) == (hits, misses)
    post(memory_server, "completions", {**body, "max_tokens": 3}, **{"Cache-Control": "no-store"})
    assert counts(memory_server) == (hits, misses)
    seeded = {**body, "seed": 7}
    assert post(memory_server, "completions", seeded)["choices"] == post(memory_server, "completions",
                                                                          seeded)["choices"]
    assert counts(memory_server) == (hits + 1, misses + 1)
    post(memory_server, "completions", seeded, **{"Cache-Control": "no-cache"})  # runs again, stores afresh
    assert counts(memory_server) == (hits + 1, misses + 2)
    post(memory_server, "completions", {**seeded, "max_tokens": 9})  # another request: another key
    assert counts(memory_server) == (hits + 1, misses + 3)


def test_redis_shared_cache_survives_a_restart(tmp_path):
    redis = redis_server()
    srv = start_server(tmp_path, "--result-cache", redis.url)
    try:
        wait_healthy(srv)
        first = post(srv, "chat/completions", CHAT)
        import redis as redis_client

        client = redis_client.Redis(port=redis.port)
        deadline = time.monotonic() + 5  # stored in the background, maybe after the response
        while client.zcard(RedisStore.INDEX) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.zcard(RedisStore.INDEX) == 1 and len(client.keys(RedisStore.PREFIX + "*")) == 1
        same_answer(first, post(srv, "chat/completions", CHAT))
        assert counts(srv) == (1, 1)
        redis.stop()
        for _ in range(3):  # Redis gone: the request runs, answers the same, and the log says so once
            same_answer(first, post(srv, "chat/completions", CHAT))
        assert srv.log().count("is unavailable") == 1
        redis.start()  # empty: nothing persisted
        time.sleep(RETRY_AFTER + 0.1)
        same_answer(first, post(srv, "chat/completions", CHAT))
        time.sleep(0.2)
        same_answer(first, post(srv, "chat/completions", CHAT))
        assert "answers again" in srv.log()
        assert counts(srv)[0] == 2
    finally:
        stop(srv)
        redis.stop()


def test_stores_expire_and_stay_bounded():
    async def fill(store) -> list[bytes | None]:
        for i in range(5):
            await store.put(f"k{i}", f"v{i}".encode())
        return [await store.get(f"k{i}") for i in range(5)]

    assert asyncio.run(fill(MemoryStore(ttl=60, max_entries=3))) == [None, None, b"v2", b"v3", b"v4"]
    redis = redis_server()
    try:
        store = RedisStore(redis.url, ttl=60, max_entries=3)
        assert asyncio.run(fill(store)) == [None, None, b"v2", b"v3", b"v4"]
        store = RedisStore(redis.url, ttl=0.2, max_entries=3)
        memory = MemoryStore(ttl=0.2, max_entries=3)

        async def expire(s) -> bytes | None:
            await s.put("x", b"1")
            await asyncio.sleep(0.3)
            return await s.get("x")

        assert asyncio.run(expire(store)) is None and asyncio.run(expire(memory)) is None
    finally:
        redis.stop()
