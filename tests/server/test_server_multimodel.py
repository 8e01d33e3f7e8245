"""One `tokenmill serve` process serving two models: the default SmolLM2 GGUF (by its catalog name) and a tiny
random HF Llama, each answering as its own LLM.generate does, routed by the request's `model` field."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serverproc import MODEL_NAME, Server, start_server, stop, wait_healthy
from tinymodel import write_tiny_llama
from tokenmill import LLM, SamplingParams
from tokenmill.server import ModelRegistry

TINY_NAME = "tiny-llama"  # the folder's name: the served name by default
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, llm_f32) -> Path:
    folder = tmp_path_factory.mktemp("models") / TINY_NAME
    write_tiny_llama(folder, llm_f32.tokenizer, seed=5)
    return folder


@pytest.fixture(scope="module")
def expected(llm_f32, tiny_dir) -> dict[str, list[str]]:
    """Each model's greedy completions, from LLM.generate in this process."""
    tiny = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=2**24)
    return {name: [out.outputs[0].text for out in llm.generate(PROMPTS, GREEDY)]
            for name, llm in ((MODEL_NAME, llm_f32), (TINY_NAME, tiny))}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_dir) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("serve"), "smollm2-135m", str(tiny_dir))
    try:
        wait_healthy(srv)
        yield srv
    finally:
        stop(srv)


@pytest.fixture(scope="module")
def client(two_models) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{two_models.url}/v1", api_key="unused", max_retries=0)


def _complete(client: openai.OpenAI, model: str, prompt: str) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert out.model == (TINY_NAME if model == TINY_NAME else MODEL_NAME)
    return out.choices[0].text


def test_models_lists_both_in_order(client, llm_f32, tiny_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME, TINY_NAME]
    assert models[1].root == str(tiny_dir)
    assert [m.max_model_len for m in models] == [llm_f32.engine.max_model_len, 512]


def test_each_model_answers_as_its_own_llm(client, expected):
    assert expected[MODEL_NAME] != expected[TINY_NAME]
    for name in (MODEL_NAME, TINY_NAME):
        assert [_complete(client, name, p) for p in PROMPTS] == expected[name]
    assert _complete(client, "smollm2-135m", PROMPTS[0]) == expected[MODEL_NAME][0]  # the name it was loaded by


def test_a_request_without_model_goes_to_the_first(two_models, expected):
    out = httpx.post(f"{two_models.url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8,
                                                                "temperature": 0}, timeout=60).json()
    assert out["model"] == MODEL_NAME and out["choices"][0]["text"] == expected[MODEL_NAME][0]


def test_unknown_model_is_a_404_listing_the_served_ones(two_models, client):
    response = httpx.post(f"{two_models.url}/v1/completions", json={"model": "x", "prompt": "Hi"}, timeout=30)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["message"] == f"The model `x` does not exist. Available models: {MODEL_NAME}, {TINY_NAME}"
    assert (error["type"], error["param"], error["code"]) == ("NotFoundError", "model", 404)
    with pytest.raises(openai.NotFoundError, match=TINY_NAME):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])


def test_concurrent_requests_to_both_models_complete(two_models, expected):
    async def main() -> list[tuple[str, int, str]]:
        async with openai.AsyncOpenAI(base_url=f"{two_models.url}/v1", api_key="unused", max_retries=0) as client:
            async def one(name: str, p: int) -> tuple[str, int, str]:
                out = await client.completions.create(model=name, prompt=PROMPTS[p], max_tokens=8, temperature=0)
                return name, p, out.choices[0].text

            return await asyncio.gather(*(one(name, i % 2) for name in (MODEL_NAME, TINY_NAME) for i in range(6)))

    for name, p, text in asyncio.run(main()):
        assert text == expected[name][p], (name, p)


def test_tokenize_and_detokenize_route_by_model(two_models, llm_f32):
    for name, max_len in ((MODEL_NAME, llm_f32.engine.max_model_len), (TINY_NAME, 512)):
        out = httpx.post(f"{two_models.url}/tokenize", json={"model": name, "prompt": "Hello"}).json()
        assert out["max_model_len"] == max_len and out["tokens"] == llm_f32.tokenizer.encode("Hello")
        back = httpx.post(f"{two_models.url}/detokenize", json={"model": name, "tokens": out["tokens"]}).json()
        assert back["prompt"] == "Hello"
    assert httpx.post(f"{two_models.url}/tokenize", json={"model": "x", "prompt": "Hi"}).status_code == 404


def test_health_and_metrics_cover_every_model(two_models, client):
    assert httpx.get(f"{two_models.url}/health").status_code == 200
    for name in (MODEL_NAME, TINY_NAME):
        _complete(client, name, PROMPTS[0])
    httpx.post(f"{two_models.url}/v1/completions", json={"model": TINY_NAME, "prompt": "Hi", "temperature": -1})
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{two_models.url}/metrics").text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    for name in (MODEL_NAME, TINY_NAME):
        assert samples["tokenmill:prompt_tokens_total"][(("model_name", name),)] > 0
        assert (("model_name", name),) in samples["tokenmill:kv_cache_usage_perc"]
    assert samples["tokenmill:request_errors_total"][(("model_name", TINY_NAME), ("status_code", "400"))] >= 1


def _state(name: str, *aliases: str) -> SimpleNamespace:
    return SimpleNamespace(served_model_name=name, accepted_model_names=frozenset(aliases))


def test_an_alias_two_models_share_routes_to_neither():
    a, b = _state("a", "/m/same.gguf", "x"), _state("b", "/m/same.gguf", "a")
    registry = ModelRegistry([a, b])
    assert registry.get(None) is a and registry.get("a") is a and registry.get("x") is a
    assert registry.get("/m/same.gguf") is None  # ambiguous
    with pytest.raises(ValueError, match="served model names must differ"):
        ModelRegistry([_state("a"), _state("a")])
