"""Conventions `vllm serve` and `llama-server` users reach for: GET /version, CORS with --allowed-origins (a
browser's preflight is answered; without the flag no origin is allowed), OpenAI's `developer` role,
--chat-template FILE and --enable-auto-tool-choice, chat echo / add_generation_prompt / continue_final_message."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from serverproc import MODEL_NAME, Server, start_server, stop, wait_healthy

ORIGIN = "http://localhost:3000"


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\nCUSTOM {{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if tools %}<|im_start|>system\nCall tools as <tool_call>{...}</tool_call><|im_end|>\n{% endif %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory) -> Iterator[Server]:
    """Also started with --chat-template (a file) and --enable-auto-tool-choice."""
    folder = tmp_path_factory.mktemp("cors")
    (folder / "template.jinja").write_text(TEMPLATE)
    srv = start_server(folder, "--allowed-origins", ORIGIN, "--chat-template", str(folder / "template.jinja"),
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
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


def test_chat_template_file_replaces_the_models(server, cors_server):
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    custom = httpx.post(f"{cors_server.url}/tokenize", json=body).json()["tokens"]
    text = httpx.post(f"{cors_server.url}/detokenize", json={"tokens": custom}).json()["prompt"]
    assert "CUSTOM Hi" in text
    plain = httpx.post(f"{server.url}/tokenize", json=body).json()["tokens"]
    assert "CUSTOM" not in httpx.post(f"{server.url}/detokenize", json={"tokens": plain}).json()["prompt"]


def test_auto_tool_choice_needs_the_flag(server, cors_server):
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "What time is it?"}], "tools": [tool], "max_tokens": 30,
            "temperature": 0}
    refused = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 400 and "--enable-auto-tool-choice" in refused.json()["error"]["message"]
    answered = httpx.post(f"{cors_server.url}/v1/chat/completions", json=body, timeout=60)
    assert answered.status_code == 200, answered.text
    message = answered.json()["choices"][0]["message"]
    assert message["content"] or message["tool_calls"]


def test_continue_final_message_with_echo(server):
    """The model goes on with the assistant's last message: the prompt ends inside it, the reply (echo) starts with
    it, and the continuation equals a plain completion of the same prompt tokens, streamed or not."""
    messages = [{"role": "user", "content": "Count to ten."}, {"role": "assistant", "content": "1, 2, 3,"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages, **options}).json()["tokens"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"].endswith("1, 2, 3,")
    plain = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"prompt": ids, "max_tokens": 6, "temperature": 0}).json()["choices"][0]["text"]
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                  extra_body={**options, "echo": True})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert whole == streamed == "1, 2, 3," + plain
    new_turn = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                              extra_body={"echo": True, "add_generation_prompt": False})
    assert new_turn.choices[0].message.content.startswith("1, 2, 3,")
