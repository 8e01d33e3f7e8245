"""Scoring text through the server, as lm-eval-harness does: `echo` + `logprobs` with `max_tokens: 0` returns the
prompt's tokens and their logprobs (the first null) and nothing generated; vLLM's `prompt_logprobs` field too."""
from __future__ import annotations

import httpx
import pytest
import torch

TEXT = "The quick brown fox jumps over the lazy dog"


def test_echo_logprobs_max_tokens_zero_scores_the_prompt(server, llm_f32):
    body = {"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    ids = llm_f32.tokenizer.encode(TEXT)
    logprobs = choice["logprobs"]
    assert choice["text"] == TEXT and response.json()["usage"]["completion_tokens"] == 0
    assert len(logprobs["tokens"]) == len(ids) and "".join(logprobs["tokens"]) == TEXT
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = torch.log_softmax(llm_f32.score(ids), -1)
    want = [float(expected[i, t]) for i, t in enumerate(ids[1:])]
    assert logprobs["token_logprobs"][1:] == pytest.approx(want, abs=1e-3)
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(ids))]


def test_echo_logprobs_with_generation_and_vllm_prompt_logprobs(server):
    body = {"prompt": TEXT, "max_tokens": 3, "echo": True, "logprobs": 0, "temperature": 0, "prompt_logprobs": 2}
    choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["text"].startswith(TEXT) and len(choice["text"]) > len(TEXT)
    prompt_entries = choice["prompt_logprobs"]
    assert prompt_entries[0] is None and all(len(e) >= 2 for e in prompt_entries[1:])
    assert len(choice["logprobs"]["tokens"]) == len(prompt_entries) + 3


@pytest.mark.parametrize("body, field", [({"max_tokens": 0}, "max_tokens"),
                                         ({"echo": True, "logprobs": 1, "stream": True}, "stream")])
def test_scoring_misuse_is_400(server, body, field):
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": TEXT, **body}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
