"""The OpenAI endpoints of a real `tokenmill serve`, through the official `openai` client and raw httpx.

Greedy results must equal LLM.generate / LLM.chat in this process (same weights, same dtype): the server adds
transport, never different tokens.
"""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from serverproc import MODEL_NAME
from tokenmill import SamplingParams

YES_NO = [{"role": "user", "content": "Reply with one word: yes or no. Is water wet?"}]  # greedy: "No." + EOS


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def sse_chunks(response: httpx.Response) -> list[dict]:
    """The JSON events of an SSE body; asserts it ends with `data: [DONE]`."""
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", response.text[-500:]
    return [json.loads(e) for e in events[:-1]]


def test_models_lists_the_short_name(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].root.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    # the checkpoint path is accepted as a model name too
    out = client.completions.create(model=models[0].root, prompt="Hi", max_tokens=1)
    assert out.model == MODEL_NAME


def test_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completion_greedy_equals_llm_generate(client, llm_f32):
    prompt = "The capital of France is"
    ref = llm_f32.generate(prompt, SamplingParams(temperature=0, max_tokens=16))[0]
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0)
    choice = out.choices[0]
    assert choice.text == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_stream_equals_non_stream(client, llm_f32):
    prompt = "Once upon a time"
    ref = llm_f32.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_greedy_equals_llm_chat_stream_and_not(client, llm_f32):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    ref = llm_f32.chat(messages, SamplingParams(temperature=0, max_tokens=16))[0]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=16, temperature=0)
    assert out.choices[0].message.content == ref.outputs[0].text
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == ref.outputs[0].finish_reason


def test_chat_content_as_text_parts(client):
    parts = [{"type": "text", "text": "Reply with one word: yes or no."}, {"type": "text", "text": "Is water wet?"}]
    joined = [{"role": "user", "content": "Reply with one word: yes or no.\nIs water wet?"}]
    a = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": parts}],
                                       max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=MODEL_NAME, messages=joined, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_ignore_eos_gives_exactly_max_tokens(client):
    natural = client.chat.completions.create(model=MODEL_NAME, messages=YES_NO, max_tokens=12, temperature=0)
    assert natural.choices[0].finish_reason == "stop" and natural.usage.completion_tokens < 12
    forced = client.chat.completions.create(model=MODEL_NAME, messages=YES_NO, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 12
    stream = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=9, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    assert list(stream)[-1].usage.completion_tokens == 9


def test_chat_default_max_tokens_fills_the_context_and_stops_at_eos(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=YES_NO, temperature=0)
    # vLLM's stop_reason: None for the model's own end token (a token id only for one the request's
    # stop_token_ids named)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].stop_reason is None
    assert out.choices[0].message.content and out.usage.completion_tokens > 1


def test_prompt_forms_n_and_choice_indices(client, llm_f32):
    ids = llm_f32.tokenizer.encode("The capital of France is")
    by_text = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=4,
                                        temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    out = client.completions.create(model=MODEL_NAME, prompt=["Hello", "One, two,"], max_tokens=3, n=2,
                                    temperature=0.8, seed=1, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    hello, count = len(llm_f32.tokenizer.encode("Hello")), len(llm_f32.tokenizer.encode("One, two,"))
    assert out.usage.prompt_tokens == hello + count  # each prompt counted once, not n times
    assert out.usage.completion_tokens == 4 * 3
    lists = client.completions.create(model=MODEL_NAME, prompt=[ids, ids[:3]], max_tokens=2, temperature=0)
    assert len(lists.choices) == 2 and lists.choices[0].text == by_text.choices[0].text[:len(lists.choices[0].text)]


def test_multi_prompt_stream_carries_every_index(server):
    body = {"model": MODEL_NAME, "prompt": ["Hello", "Goodbye", "Why"], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    chunks = sse_chunks(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60))
    finished = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"] and c["choices"][0].get("finish_reason")}
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_echo_seed_stop_and_user(client):
    echoed = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=3,
                                       temperature=0, echo=True, user="alice")
    assert echoed.choices[0].text.startswith("The capital of France is ")
    a, b = (client.completions.create(model=MODEL_NAME, prompt="Once", max_tokens=8, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    stopped = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=20,
                                        temperature=0, stop="\n")
    assert stopped.choices[0].text == " Paris." and stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].stop_reason == "\n"


def test_logprobs_both_shapes(client):
    out = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=3,
                                    temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and logprob <= 0 and 2 <= len(top) <= 3
        assert logprob == max(top.values())  # greedy picked the most likely token
    chat = client.chat.completions.create(model=MODEL_NAME, messages=YES_NO, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.bytes == list(entry.token.encode())


def test_unknown_fields_are_ignored(server):
    """Fields neither OpenAI nor vLLM define are let through and logged (clients send them); known ones work."""
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "priority": -5, "logit_bias": {}, "best_of": 1,
            "whatever": [1], "zzz_client_hint": "x"}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert "ignoring request fields tokenmill does not support: 'whatever', 'zzz_client_hint'" in server.log()


def test_ignored_field_names_cannot_forge_log_lines(server):
    body = {"prompt": "Hi", "max_tokens": 1, "x\n2026-01-01 00:00:00 INFO forged": 1}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    assert "'x\\n2026-01-01 00:00:00 INFO forged'" in server.log()
    assert "\n2026-01-01 00:00:00 INFO forged" not in server.log()


def test_tokenize_and_detokenize(server, llm_f32):
    text = "Hello world, tokens!"
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()
    assert tok["tokens"] == llm_f32.tokenizer.encode(text) and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 8192
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": YES_NO}).json()
    assert chat["tokens"] == llm_f32.tokenizer.apply_chat_template(YES_NO, add_generation_prompt=True, tokenize=True)
    detok = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == text


def test_request_log_line_has_the_facts_but_no_prompt(client, server):
    secret = "The secret word is pumpernickel"
    out = client.completions.create(model=MODEL_NAME, prompt=secret, max_tokens=3, temperature=0)
    line = _wait_for_log(server, out.id)
    assert re.search(rf"request_id={out.id} prompt_tokens={out.usage.prompt_tokens} cached_tokens=\d+ "
                     rf"output_tokens=3 finish_reason=length ttft_s=[\d.]+ e2e_s=[\d.]+", line), line
    assert "pumpernickel" not in server.log()


def _wait_for_log(server, request_id: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if f"request_id={request_id}" in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}:\n{server.log()[-2000:]}")


def test_sixteen_concurrent_streams_interleave(server):
    """All finish with every token, and their chunks arrive interleaved (one batch), not one stream after another."""
    arrivals: list[int] = []

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        body = {"model": MODEL_NAME, "prompt": f"Story number {i}:", "max_tokens": 10, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
        text, usage, done = "", None, False
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        arrivals.append(i)
                        text += chunk["choices"][0]["text"]
                    usage = chunk.get("usage") or usage
        return {"done": done, "usage": usage, "text": text}

    async def main() -> list[dict]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(main())
    assert all(r["done"] and r["usage"]["completion_tokens"] == 10 for r in results)
    runs = 1 + sum(a != b for a, b in zip(arrivals, arrivals[1:]))
    assert runs >= 3 * 16, f"chunks came stream after stream ({runs} runs): {arrivals}"


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_hangs_up_aborts_its_request_and_frees_kv(server, stream):
    before = server.metrics()
    body = {"model": MODEL_NAME, "prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True,
            "stream": stream}
    if stream:  # read a few chunks, then close the connection mid-stream
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(line for line in lines if line.startswith("data: "))
    else:  # give up waiting for the whole body (whether or not its first token came: both are an abort)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    aborts = 'tokenmill:request_success_total{finished_reason="abort"}'
    deadline = time.monotonic() + 30
    while server.metrics().get(aborts, 0) < before.get(aborts, 0) + 1:  # the server noticed the hang-up
        assert time.monotonic() < deadline, "the abort was never counted"
        time.sleep(0.05)
    generated = server.metrics()["tokenmill:generation_tokens_total"]
    time.sleep(0.5)
    after = server.metrics()
    assert after["tokenmill:generation_tokens_total"] == generated < before["tokenmill:generation_tokens_total"] + 100
    assert after[aborts] == before.get(aborts, 0) + 1
    # engine gauges are as of the loop's last step, so step once more, then every KV block must be free
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    after = server.metrics()
    assert after["tokenmill:num_requests_running"] == 0
    assert after["tokenmill:kv_cache_usage_perc"] == 0
    assert "Traceback" not in server.log()


def test_metrics_counters_move_by_the_request(server):
    before = server.metrics()
    body = {"model": MODEL_NAME, "prompt": "Count: one, two,", "max_tokens": 7, "ignore_eos": True}
    usage = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["usage"]
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "temperature": -1}, timeout=60)
    after = server.metrics()

    def moved(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert moved("tokenmill:generation_tokens_total") == usage["completion_tokens"] == 7
    assert moved("tokenmill:prompt_tokens_total") == usage["prompt_tokens"]
    assert moved('tokenmill:request_success_total{finished_reason="length"}') == 1
    assert moved('tokenmill:request_errors_total{status_code="400"}') == 1
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "time_per_output_token_seconds"):
        assert moved(f"tokenmill:{histogram}_count") == 1, histogram
    assert moved("tokenmill:inter_token_latency_seconds_count") == 6  # 7 tokens, 6 gaps
    assert moved("tokenmill:prefix_cache_queries_total") > 0
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                  "num_preemptions_total", "prefix_cache_hits_total"):
        assert f"tokenmill:{gauge}" in after, gauge


def test_cache_config_info(server):
    """vLLM's cache_config_info: the KV cache's configuration in the labels of a gauge at 1."""
    (name, value), = ((k, v) for k, v in server.metrics().items() if k.startswith("tokenmill:cache_config_info"))
    assert value == 1 and 'block_size="16"' in name and 'kv_cache_dtype="float32"' in name
    assert 'kv_cache_bits=""' in name  # turboquant's only
    assert 'kv_cache_recent_blocks="0"' in name  # compressed caches' only
    labels = dict(part.split("=") for part in name[name.index("{") + 1:-1].split(","))
    assert int(labels["num_blocks"].strip('"')) * int(labels["bytes_per_block"].strip('"')) <= 512 * 2**20


def test_unknown_route_and_method_are_openai_errors(server):
    missing = httpx.post(f"{server.url}/v1/images/generations", json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    wrong = httpx.get(f"{server.url}/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "MethodNotAllowedError"


def test_openai_client_raises_the_matching_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=YES_NO)


# `vllm bench serve` (vllm/benchmarks/lib/endpoint_request_func.py, vLLM 0.32) sends exactly these bodies, with an
# x-request-id header. It reads usage only from a chunk whose `choices` is empty (else it silently re-tokenizes the
# text to count), takes TTFT at the first chunk with choices, and indexes `choices[0]["delta"]` on chat.
VLLM_BENCH_BODIES = {
    "/v1/completions": {"model": MODEL_NAME, "prompt": "Once upon a time", "repetition_penalty": 1.0,
                        "max_tokens": 12, "logprobs": None, "stream": True,
                        "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0},
    "/v1/chat/completions": {"model": MODEL_NAME, "max_completion_tokens": 12, "stream": True,
                             "messages": [{"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]}],
                             "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0},
}


@pytest.mark.parametrize("path", list(VLLM_BENCH_BODIES))
def test_vllm_bench_serve_requests_are_served_as_it_parses_them(server, path):
    response = httpx.post(f"{server.url}{path}", json=VLLM_BENCH_BODIES[path], timeout=120,
                          headers={"x-request-id": "bench-4e492a43-0"})
    assert response.status_code == 200, response.text
    chunks = sse_chunks(response)
    with_choices = [c for c in chunks if c.get("choices")]
    usage = [c["usage"] for c in chunks if not c.get("choices") and c.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == 12 and usage[0]["prompt_tokens"] > 0
    if path == "/v1/chat/completions":
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    else:
        text = "".join(c["choices"][0].get("text") or "" for c in with_choices)
    assert text.strip() and with_choices[-1]["choices"][0]["finish_reason"] == "length"
