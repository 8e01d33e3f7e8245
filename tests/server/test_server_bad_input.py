"""Bad input through a real `tokenmill serve`: each case is a 4xx in OpenAI's error shape naming the field, the
connection stays open, and the next good request on it is served."""
from __future__ import annotations

import json

import httpx
import pytest

YES_NO = [{"role": "user", "content": "Reply with one word: yes or no. Is water wet?"}]


BAD = [
    # (endpoint, body, status, param, words the message must contain)
    ("completions", "{not json", 400, None, "JSON"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ("completions", {"prompt": "x", "top_k": -2}, 400, "top_k", "top_k"),
    ("completions", {"prompt": "x", "min_p": 2}, 400, "min_p", "min_p"),
    ("completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "presence_penalty"),
    ("completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty", "frequency_penalty"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "repetition_penalty"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 9000}, 400, "max_tokens", "maximum context length"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n", "n must"),
    ("completions", {"prompt": "x", "seed": 2**64}, 400, "seed", "seed"),
    ("completions", {"prompt": "x", "stop": [1]}, 400, "stop", "stop"),
    ("completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "logprobs"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("completions", {"max_tokens": 3}, 400, "prompt", "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt", "prompt"),
    ("completions", {"prompt": []}, 400, "prompt", "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt", "prompt"),
    ("completions", {"prompt": [49152]}, 400, "prompt", "prompt"),
    ("completions", {"prompt": "word " * 9000, "max_tokens": None}, 400, "prompt", "max_model_len"),
    ("chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "text parts"),
    ("chat/completions", {"messages": YES_NO, "max_completion_tokens": 9000}, 400, "max_completion_tokens",
     "max_completion_tokens"),
    ("chat/completions", {"messages": YES_NO, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("chat/completions", {"messages": YES_NO, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", "20"),
    ("chat/completions", {"messages": YES_NO, "logprobs": "maybe"}, 400, "logprobs", "logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x " * 9000}]}, 400, "messages", "max_model_len"),
    ("detokenize", {"tokens": [-1]}, 400, "tokens", "tokens"),
    ("tokenize", {}, 400, "prompt", "prompt"),
    ("completions", "", 400, None, "body is missing"),
    ("completions", {"prompt": "word " * 9000, "max_tokens": 1}, 400, "prompt", "max_model_len"),
    ("chat/completions", {"messages": YES_NO, "max_completion_tokens": 0}, 400, "max_completion_tokens",
     "max_completion_tokens must be"),
    # issue 17: text that is not Unicode, unbounded requests, non-finite numbers
    ("tokenize", '{"prompt": "a\\ud800"}', 400, "prompt", "surrogate"),
    ("completions", '{"prompt": "a\\udfff b", "max_tokens": 2}', 400, "prompt", "surrogate"),
    ("completions", '{"prompt": ["ok", "a\\ud800"]}', 400, "prompt[1]", "surrogate"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80"}]}', 400,
     "messages[0].content", "surrogate"),
    ("completions", '{"prompt": "x", "stop": ["\\ud800"]}', 400, "stop[0]", "surrogate"),
    ("completions", {"prompt": "x", "n": 1000}, 400, "n", "--max-n"),
    ("completions", {"prompt": ["x"] * 300}, 400, "prompt", "--max-prompts"),
    ("completions", {"prompt": "x", "stop": [f"s{i}" for i in range(200)]}, 400, "stop", "at most 128"),
    ("completions", {"prompt": "x", "stop": ["y" * 600]}, 400, "stop", "512 characters"),
    ("completions", '{"prompt": "x", "temperature": Infinity}', 400, "temperature", "finite"),
    ("completions", '{"prompt": "x", "top_p": NaN}', 400, "top_p", "finite"),
    ("completions", '{"prompt": "x", "presence_penalty": -Infinity}', 400, "presence_penalty", "finite"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e999}', 400,
     "repetition_penalty", "finite"),
]


@pytest.mark.parametrize("endpoint,body,status,param,words", BAD,
                         ids=[f"{e}:{p}:{i}" for i, (e, _, _, p, _) in enumerate(BAD)])
def test_bad_input_is_an_openai_error_naming_the_field(server, endpoint, body, status, param, words):
    path = f"/v1/{endpoint}" if "completions" in endpoint else f"/{endpoint}"
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    with httpx.Client(timeout=60) as http:
        response = http.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and error["code"] == status
        assert words in error["message"], error["message"]
        # the connection stays open, and the next good request on it is served
        assert response.headers.get("connection") != "close"
        ok = http.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert ok.status_code == 200
    assert "Traceback" not in server.log()
