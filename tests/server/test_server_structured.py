"""Structured output and the sampling fields over HTTP, through the `openai` client against a real server: the
outputs hold their constraint, the fields reach the engine, and the fields the server does not implement are a
400 naming them (never a 200 that ignores them)."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from serverproc import MODEL_NAME
from test_structured_output import SCHEMAS

jsonschema = pytest.importorskip("jsonschema")
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_response_format_json_schema_sampled(client):
    for i, schema in enumerate(SCHEMAS):
        out = client.chat.completions.create(
            model=MODEL_NAME, messages=ASK, temperature=0.8, seed=i, max_tokens=150,
            response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema,
                                                                    "strict": True}})
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_json_object_and_streamed_schema(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=ASK, temperature=0.8, seed=3, max_tokens=80,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, temperature=0.8, seed=4, max_tokens=150, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[0]}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_vllm_guided_fields(client):
    pattern = r"\d{3}-[a-z]{3}"
    out = client.completions.create(model=MODEL_NAME, prompt="Code:", temperature=1.0, seed=1, max_tokens=20,
                                    extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, out.choices[0].text)
    choices = ["alpha", "beta", "gamma"]
    out = client.completions.create(model=MODEL_NAME, prompt="Pick one:", temperature=1.0, seed=2, n=3,
                                    extra_body={"guided_choice": choices})
    assert all(c.text in choices for c in out.choices)
    out = client.completions.create(model=MODEL_NAME, prompt="JSON:", temperature=0.8, seed=5, max_tokens=150,
                                    extra_body={"structured_outputs": {"json": SCHEMAS[2]}})
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMAS[2])


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 2}}}}, "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_decoding_backend": "xgrammar", "guided_regex": "a+"}, "guided_decoding_backend"),
])
def test_bad_constraints_are_400_naming_the_field(server, body, field):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": ASK, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"] + str(response.json()["error"].get("param"))


def test_logit_bias_bans_and_forces(server, client):
    plain = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", temperature=0,
                                      max_tokens=8, logprobs=0)
    first = plain.choices[0].logprobs.tokens[0]
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": plain.choices[0].text,
                                                        "add_special_tokens": False}).json()["tokens"]
    banned = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", temperature=0,
                                       max_tokens=8, logit_bias={str(t): -100 for t in tokens}, logprobs=0)
    assert first not in banned.choices[0].logprobs.tokens[:1]
    assert not set(banned.choices[0].logprobs.tokens) & set(plain.choices[0].logprobs.tokens)
    forced = client.completions.create(model=MODEL_NAME, prompt="Hi", temperature=1.0, seed=0, max_tokens=6,
                                       logit_bias={"1234": 100})
    detok = httpx.post(f"{server.url}/detokenize", json={"tokens": [1234] * 6}).json()
    assert forced.choices[0].text == detok["prompt"]


def test_sampling_fields_reach_the_engine(client):
    plain = client.completions.create(model=MODEL_NAME, prompt="Count: one, two,", temperature=0, max_tokens=12)
    out = client.completions.create(model=MODEL_NAME, prompt="Count: one, two,", temperature=0, max_tokens=12,
                                    stop=[","], extra_body={"include_stop_str_in_output": True})
    assert out.choices[0].text.endswith(",") and out.choices[0].stop_reason == ","
    assert plain.choices[0].text.startswith(out.choices[0].text)
    word = plain.choices[0].text.split()[0].strip(",")
    without = client.completions.create(model=MODEL_NAME, prompt="Count: one, two,", temperature=0, max_tokens=12,
                                        extra_body={"bad_words": [word], "min_tokens": 3})
    assert word not in without.choices[0].text and without.usage.completion_tokens >= 3


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"],
    "additionalProperties": False}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls, names=("get_weather", "get_time")):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_tool_choice_required_and_named(client):
    for seed in range(2):
        out = client.chat.completions.create(model=MODEL_NAME, messages=WEATHER_ASK, tools=[WEATHER, TIME],
                                             tool_choice="required", temperature=0.8, seed=seed, max_tokens=150)
        assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
        _check_calls(out.choices[0].message.tool_calls)
    named = client.chat.completions.create(model=MODEL_NAME, messages=WEATHER_ASK, tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           temperature=0.8, seed=1, max_tokens=100)
    calls = named.choices[0].message.tool_calls
    _check_calls(calls, ("get_time",))
    assert len(calls) == 1


def test_streamed_tool_calls_reassemble_to_the_same_call(client):
    kwargs = dict(model=MODEL_NAME, messages=WEATHER_ASK, tools=[WEATHER], tool_choice="required", temperature=0,
                  max_tokens=150, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    assert len(whole) == 1 and [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (whole[0].function.name, json.loads(whole[0].function.arguments))]


def test_tool_messages_continue_the_conversation(client):
    history = WEATHER_ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=20)
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls


@pytest.mark.parametrize("route, body, field", [
    # "auto", the default with tools: the default model's template has no call format
    ("chat/completions", {"tools": [WEATHER]}, "tool_choice"),
    ("chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("chat/completions", {"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt too
    ("chat/completions", {"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ("completions", {"suffix": "return x"}, "suffix"),  # the default model has no fill-in-the-middle tokens
    ("completions", {"best_of": 3, "stream": True}, "best_of"),
    ("completions", {"best_of": 1, "n": 2}, "best_of"),
    ("chat/completions", {"best_of": 3}, "best_of"),
    ("chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
])
def test_fields_not_implemented_are_400(server, route, body, field):
    base = {"messages": ASK} if route.startswith("chat") else {"prompt": "Hi"}
    response = httpx.post(f"{server.url}/v1/{route}", json={**base, **body, "max_tokens": 4}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_best_of_returns_the_most_likely(client):
    out = client.completions.create(model=MODEL_NAME, prompt="The best fruit is", temperature=1.0, seed=3, n=2,
                                    max_tokens=8, logprobs=0, extra_body={"best_of": 5})
    assert len(out.choices) == 2 and [c.index for c in out.choices] == [0, 1]
    totals = [sum(c.logprobs.token_logprobs) for c in out.choices]
    assert totals[0] >= totals[1]
