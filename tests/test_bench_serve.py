"""`bench serve` against a fake OpenAI-compatible server that streams SSE and fails on purpose, then end to end
against a live `tokenmill serve`.

The fake server is plain asyncio speaking HTTP/1.1 by hand, so a test can break a stream mid-body exactly the way
a crashing server does (an unterminated chunked body), without any web framework. What it does is chosen by the
prompt: "ok ...", "http500", "broken", "nousage", "nodone", "errorevent".
"""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from serverproc import start_server, stop, wait_healthy
from tokenmill.bench import BenchError
from tokenmill.bench.datasets import SampleRequest
from tokenmill.bench.load_generator import ServeConfig, arrival_offsets, request_body, run
from tokenmill.bench.metrics import compute_metrics
from tokenmill.bench.peers import free_port
from tokenmill.bench.report import serve_table

FIRST_DELAY, GAP = 0.05, 0.01  # the fake server's time to first chunk and between chunks, seconds


class FakeOpenAIServer:
    """Serves /health, /v1/models and streaming /v1/completions + /v1/chat/completions on a background loop."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode()
        headers = {}
        while (line := (await reader.readline()).decode().strip()):
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        method, path, _ = request_line.split(" ", 2)
        try:
            if path == "/health":
                self._reply(writer, 200, {"status": "ok"})
            elif path == "/v1/models":
                self._reply(writer, 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                await self._completion(writer, json.loads(body), chat=path.endswith("chat/completions"))
            else:
                self._reply(writer, 404, {"error": {"message": f"no route {path}"}})
            await writer.drain()
        finally:
            writer.close()

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
                     f"connection: close\r\n\r\n".encode() + data)

    async def _completion(self, writer: asyncio.StreamWriter, body: dict, chat: bool) -> None:
        self.bodies.append(body)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        mode = prompt.split()[0] if prompt.split()[0] in ("http500", "broken", "nousage", "nodone",
                                                           "errorevent") else "ok"
        if mode == "http500":
            self._reply(writer, 500, {"error": {"message": "internal error", "type": "server_error"}})
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                     b"connection: close\r\n\r\n")

        def event(payload: dict | str) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            data = f"data: {text}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            n = body["max_tokens"]
            if chat:
                event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})  # no content yet
            await asyncio.sleep(FIRST_DELAY)
            for i in range(n):
                if mode == "broken" and i == 2:
                    await writer.drain()
                    writer.transport.abort()  # the connection drops mid-body, as when a server crashes
                    return
                if mode == "errorevent" and i == 1:
                    event({"error": {"message": "engine died", "code": 500}})
                    break
                choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
                choice |= {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
                event({"choices": [choice]})
                await writer.drain()
                await asyncio.sleep(GAP)
            if mode != "nousage":
                event({"choices": [], "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                                                "total_tokens": len(prompt.split()) + n}})
            if mode != "nodone":
                event("[DONE]")
            writer.write(b"0\r\n\r\n")
        finally:
            self.in_flight -= 1


@pytest.fixture
def fake_server():
    server = FakeOpenAIServer()
    yield server
    server.close()


def requests_of(*prompts: str, output_len: int = 5) -> list[SampleRequest]:
    return [SampleRequest(p, output_len) for p in prompts]


def test_closed_loop_streams_and_times_every_request(fake_server):
    config = ServeConfig(base_url=fake_server.base_url + "/v1", max_concurrency=3, ignore_eos=True, progress=False)
    result = run(config, requests_of(*(f"ok prompt number {i}" for i in range(8))))
    assert result.model == "fake-model"  # read from /v1/models
    assert fake_server.max_in_flight == 3  # never more than --max-concurrency in flight
    warmup, *bodies = fake_server.bodies
    assert len(bodies) == 8
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} and b["ignore_eos"] for b in bodies)
    assert {b["model"] for b in bodies} == {"fake-model"} and {b["max_tokens"] for b in bodies} == {5}
    for record in result.records:
        assert record.success, record.error
        assert (record.prompt_tokens, record.completion_tokens, record.finish_reason) == (4, 5, "length")
        assert len(record.chunk_times) == 5
        assert record.chunk_times[0] >= FIRST_DELAY  # nothing can arrive before the server sends it
        assert record.chunk_times == sorted(record.chunk_times) and record.latency >= record.chunk_times[-1]
    m = compute_metrics(result.records, result.duration_s)
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (8, 0, 32, 40)
    assert m.itl_ms.count == 8 * 4 and m.tpot_ms.count == 8
    assert m.ttft_ms.p99 >= FIRST_DELAY * 1000
    assert result.duration_s >= 3 * (FIRST_DELAY + 5 * GAP)  # 8 requests, 3 at a time: at least 3 rounds


def test_failures_are_counted_and_kept_out_of_latencies(fake_server):
    prompts = ["ok a", "http500 b", "ok c", "broken d", "nousage e", "nodone f", "errorevent g", "ok h"]
    result = run(ServeConfig(base_url=fake_server.base_url, max_concurrency=4, progress=False),
                 requests_of(*prompts))
    by_prompt = dict(zip(prompts, result.records))
    assert [r.success for r in result.records] == [p.startswith("ok") for p in prompts]
    assert by_prompt["http500 b"].error.startswith("HTTP 500: ") and "internal error" in by_prompt["http500 b"].error
    assert by_prompt["broken d"].error.startswith("broken stream: RemoteProtocolError")
    assert len(by_prompt["broken d"].chunk_times) == 2  # its partial timings are kept in the record...
    assert by_prompt["nousage e"].error.startswith("missing usage")
    assert by_prompt["nodone f"].error.startswith("broken stream: it ended before [DONE]")
    assert by_prompt["errorevent g"].error.startswith("error event: ")
    assert "engine died" in by_prompt["errorevent g"].error

    m = compute_metrics(result.records, result.duration_s)
    assert (m.completed, m.failed) == (3, 5)
    assert m.errors == {"HTTP 500": 1, "broken stream": 2, "missing usage": 1, "error event": 1}
    assert m.ttft_ms.count == m.e2el_ms.count == m.tpot_ms.count == 3  # ...but no failed one is in a distribution
    assert m.itl_ms.count == 3 * 4
    assert m.total_output_tokens == 15 and m.total_input_tokens == 6
    text = serve_table(m, 4, math.inf)
    assert "Failed requests:                         5" in text
    assert "broken stream:                           2" in text


def test_chat_endpoint_sends_messages_and_skips_empty_deltas(fake_server):
    config = ServeConfig(base_url=fake_server.base_url, endpoint="chat", model="my-model", progress=False)
    result = run(config, [SampleRequest("ok what is a cat?", 3, system="You are terse."),
                          SampleRequest("ok hi", 3)])
    assert all(r.success for r in result.records)
    assert all(len(r.chunk_times) == 3 for r in result.records)  # the role-only first delta is not a token
    bodies = sorted(fake_server.bodies[1:], key=lambda b: len(b["messages"]), reverse=True)  # sent concurrently
    assert bodies[0]["model"] == "my-model"
    assert bodies[0]["messages"] == [{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": "ok what is a cat?"}]
    assert bodies[1]["messages"] == [{"role": "user", "content": "ok hi"}]
    assert "ignore_eos" not in bodies[0]


def test_transformers_backend_sends_its_own_fields_and_needs_no_done(fake_server):
    config = ServeConfig(base_url=fake_server.base_url, backend="transformers", ignore_eos=True, max_concurrency=2,
                         progress=False)
    prompts = ["nodone a", "ok b", "broken c", "nousage d"]
    result = run(config, requests_of(*prompts))
    assert [r.success for r in result.records] == [True, True, False, False]
    done_at_end = result.records[0]  # a clean end of the body after the usage chunk is the end of the request
    assert done_at_end.completion_tokens == 5 and done_at_end.latency >= done_at_end.chunk_times[-1]
    assert result.records[2].error.startswith("broken stream: RemoteProtocolError")
    assert result.records[3].error.startswith("missing usage")
    for body in fake_server.bodies:  # the warm-up too
        assert "ignore_eos" not in body and json.loads(body["generation_config"]) == {"eos_token_id": -1,
                                                                                   "do_sample": False}
    sampled = request_body(ServeConfig("http://x", backend="transformers", ignore_eos=True, temperature=0.7), "m",
                           SampleRequest("hi", 4))
    assert json.loads(sampled["generation_config"])["do_sample"] is True  # it replaces the model's defaults
    with pytest.raises(BenchError, match="--backend must be one of openai, transformers, got 'sglang'"):
        run(ServeConfig(base_url=fake_server.base_url, backend="sglang", progress=False), requests_of("ok"))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_transformers_serve_accepts_our_bodies_and_rejects_vllms_field(endpoint):
    """Checked with the installed transformers' own request validation, which answers 422 to unknown fields."""
    from fastapi import HTTPException

    pytest.importorskip("transformers.cli.serving", reason="transformers serve is an optional peer ('.[bench]')")
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler

    handler_class = {"completions": CompletionHandler, "chat": ChatCompletionHandler}[endpoint]
    handler = handler_class.__new__(handler_class)  # validation reads only class attributes
    request = SampleRequest("What is a cat?", 8, system="You are terse.")
    ours = request_body(ServeConfig("http://x", endpoint=endpoint, backend="transformers", ignore_eos=True), "m",
                        request)
    handler._validate_request(ours)
    vllm_style = request_body(ServeConfig("http://x", endpoint=endpoint, ignore_eos=True), "m", request)
    with pytest.raises(HTTPException, match="ignore_eos"):
        handler._validate_request(vllm_style)


def test_poisson_arrivals_pace_the_sends(fake_server):
    offsets = arrival_offsets(6, 20.0, seed=3)
    assert offsets == arrival_offsets(6, 20.0, seed=3) and offsets[0] == 0 and offsets == sorted(offsets)
    result = run(ServeConfig(base_url=fake_server.base_url, request_rate=20.0, seed=3, progress=False),
                 requests_of(*(["ok x"] * 6), output_len=2))
    for record, offset in zip(result.records, offsets):
        assert record.success and record.send_time >= offset - 1e-3  # no request leaves before its arrival time
    gaps = arrival_offsets(4000, 50.0, seed=0)
    assert gaps[-1] / 3999 == pytest.approx(1 / 50.0, rel=0.1)  # exponential gaps with mean 1 / rate
    assert arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]


def test_unreachable_server_is_a_clear_error():
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BenchError, match="could not read a model id .* pass --model"):
        run(ServeConfig(base_url=dead, progress=False), requests_of("ok"))
    with pytest.raises(BenchError, match="warm-up request .* failed: broken stream: ConnectError"):
        run(ServeConfig(base_url=dead, model="m", progress=False), requests_of("ok"))


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_serve_writes_a_complete_results_file(fake_server, tmp_path):
    out = tmp_path / "results.json"
    proc = _bench("serve", "--base-url", fake_server.base_url, "--dataset", "builtin", "--num-prompts", "6",
                  "--max-concurrency", "2", "--output-len", "4", "--goodput", "ttft:5000", "tpot:1000",
                  "--save-result", str(out), "--label", "fake")
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "Successful requests:                     6" in proc.stdout
    assert "requests: 100%" in proc.stderr  # the progress bar
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "serve" and doc["config"]["label"] == "fake"
    assert doc["config"]["max_concurrency"] == 2 and doc["config"]["request_rate"] == "inf"
    assert doc["config"]["dataset"]["name"] == "builtin" and doc["config"]["model"] == "fake-model"
    assert {"cpu", "flags", "torch", "threads"} <= doc["hardware"].keys()
    assert doc["metrics"]["completed"] == 6 and doc["metrics"]["goodput"] == pytest.approx(
        6 / doc["metrics"]["duration_s"])
    assert len(doc["requests"]) == 6
    for row in doc["requests"]:
        assert row["success"] and len(row["chunk_times"]) == 4 and len(row["itl_s"]) == 3
        assert row["ttft_s"] == row["chunk_times"][0] and row["tpot_s"] > 0


def test_cli_bad_option_is_a_clean_error():
    proc = _bench("serve", "--base-url", "http://127.0.0.1:1", "--input-len", "9:3")
    assert proc.returncode == 2 and "1 <= MIN <= MAX" in proc.stderr and "Traceback" not in proc.stderr
    proc = _bench("serve", "--base-url", "http://127.0.0.1:1", "--goodput", "speed:3", "--dataset", "builtin")
    assert proc.returncode == 2 and proc.stderr.startswith("error: an SLO is") and "Traceback" not in proc.stderr


# --- end to end against the real server -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenmill_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("serve"))
    try:
        wait_healthy(server, timeout=300)
        yield server.url
    finally:
        stop(server)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_serve_against_live_tokenmill_serve(tokenmill_server, tmp_path, endpoint):
    out = tmp_path / "results.json"
    proc = _bench("serve", "--base-url", tokenmill_server, "--endpoint", endpoint, "--dataset", "random",
                  "--num-prompts", "8", "--max-concurrency", "4", "--input-len", "32:64", "--output-len", "16",
                  "--ignore-eos", "--seed", "1", "--save-result", str(out), "--label", "tokenmill")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Successful requests:                     8" in proc.stdout, proc.stdout
    assert "Failed requests:                         0" in proc.stdout
    doc = json.loads(out.read_text())
    m = doc["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (8, 0, 8 * 16)  # ignore_eos: all 16
    assert m["total_input_tokens"] >= 8 * 32
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert m[key]["count"] > 0 and 0 < m[key]["median"] <= m[key]["p99"]
    assert m["output_throughput"] > 0 and m["duration_s"] > 0
    for row in doc["requests"]:
        assert row["success"] and row["completion_tokens"] == 16 and row["finish_reason"] == "length"
        assert row["prompt_tokens"] > 0 and 0 < row["ttft_s"] <= row["latency"]
        assert row["chunk_times"] == sorted(row["chunk_times"]) and len(row["chunk_times"]) >= 2
    if endpoint == "completions":
        assert all(abs(r["prompt_tokens"] - r["prompt_len"]) <= 1 for r in doc["requests"])  # same tokenizer
    assert doc["hardware"]["torch"] and Path(out).stat().st_size > 0
