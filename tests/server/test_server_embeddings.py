"""POST /v1/embeddings through the `openai` client: the same vectors as LLM.embed, base64 and float alike, usage
counted, bad input a 400 naming the field."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from serverproc import MODEL_NAME


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_embeddings_equal_llm_embed(client, llm_f32):
    texts = ["The cat sat on the mat.", "Share prices dropped."]
    out = client.embeddings.create(model=MODEL_NAME, input=texts)
    want = [o.outputs.embedding for o in llm_f32.embed(texts)]
    assert [d.index for d in out.data] == [0, 1]
    for data, vector in zip(out.data, want):
        assert np.allclose(data.embedding, vector, atol=1e-4)
    assert out.usage.prompt_tokens == sum(len(llm_f32.tokenizer.encode(t)) for t in texts)


def test_base64_and_token_ids(server, llm_f32):
    ids = llm_f32.tokenizer.encode("Hello there")
    body = {"input": ids, "encoding_format": "base64"}
    data = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(data), dtype="<f4")
    assert np.allclose(decoded, llm_f32.embed({"prompt_token_ids": ids})[0].outputs.embedding, atol=1e-4)


@pytest.mark.parametrize("body, field", [({"input": ""}, "input"), ({"input": []}, "input"),
                                         ({"input": "x", "dimensions": 7}, "dimensions"),
                                         ({"input": "x", "encoding_format": "int8"}, "encoding_format")])
def test_bad_input_is_400(server, body, field):
    response = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in (error["param"] or "") + error["message"]
