"""The GPU path end to end (device="cuda": packed weights in the GPU layout, per-row paged attention, the engine's
batching, chunked prefill and prefix caching unchanged) gives the CPU path's greedy tokens on small random Qwen2
and Gemma 3 checkpoints, float32 on both sides. The CPU side runs without its native kernels (plain PyTorch, the
same float math as the Triton kernels: the native ones quantize activations to int8; its dequantize-and-multiply
path in float32, not the bfloat16 it takes on CPUs with native bfloat16). Decode steps run padded to
the CUDA graphs' fixed sizes (eagerly: no GPU here; model/decode_graphs.py) unless enforce_eager."""
from __future__ import annotations

import httpx
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from hf_reference import greedy
from test_hf_architectures import GEMMA, _randomize, _save, small_qwen2
from tokenmill import LLM
from tokenmill.kernels import native
from tokenmill.model.layers import quantized

PROMPTS = [[(i * 7919 + 13 * j) % 40000 + 100 for i in range(n)] for j, n in enumerate((21, 5, 34))]


@pytest.fixture(autouse=True)
def plain_cpu_kernels(monkeypatch, device):
    monkeypatch.setattr(quantized, "GEMM_DTYPE", torch.float32)
    monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", "0")
    native.library.cache_clear()
    yield
    monkeypatch.undo()
    native.library.cache_clear()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("qwen2")
    small_qwen2(folder, tokenizer_dir, hidden_size=128)  # head_dim 32: the int4 cache's smallest
    return folder


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(1)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA, num_hidden_layers=4, sliding_window=8)).eval()
    _randomize(model, "norm", 0.5)
    folder = tmp_path_factory.mktemp("gemma3")
    _save(folder, model, tokenizer_dir)
    return folder


def _tokens(folder, device: str, **kwargs) -> list[list[int]]:
    llm = LLM(str(folder), dtype="float32", device=device, block_size=4, max_num_batched_tokens=16,
              kv_cache_memory=1 << 22, weight_cache=False, **kwargs)
    if device == "cuda":
        runner = llm.engine.runner
        assert runner.gpu is not None and runner.fused is None
        assert (runner.decode_graphs is None) == kwargs.get("enforce_eager", False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(8))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kwargs", [{}, {"quantization": "int4"}, {"quantization": "int8", "kv_cache_dtype": "int8"},
                                    {"kv_cache_dtype": "int4", "kv_cache_smoothing": False}],  # GPU path: no smoothing
                         ids=["float", "int4", "int8-kv-int8", "kv-int4"])
def test_qwen2_greedy_equals_cpu_path(qwen2, kwargs):
    assert _tokens(qwen2, "cuda", **kwargs) == _tokens(qwen2, "cpu", **kwargs)


@pytest.mark.slow  # 20 s under the interpreter
def test_eager_steps_equal_fixed_size_steps(qwen2):
    eager = _tokens(qwen2, "cuda", quantization="int4", enforce_eager=True)
    assert eager == _tokens(qwen2, "cuda", quantization="int4")


@pytest.mark.slow  # 15 s under the interpreter
def test_gemma3_sliding_windows_greedy_equals_cpu_path(gemma3):
    assert _tokens(gemma3, "cuda", quantization="int4") == _tokens(gemma3, "cpu", quantization="int4")


def test_served_gpu_path_runs_its_core_in_a_thread(qwen2, tmp_path):
    """`tokenmill serve --device cuda`: the engine core is a thread of the API process (a CUDA context cannot cross
    the fork the CPU path's core is made by); its answer is the offline GPU path's, streamed and not."""
    from serverproc import start_server, stop, wait_healthy

    prompt = PROMPTS[0]
    llm = LLM(str(qwen2), dtype="float32", device="cuda", kv_cache_memory=1 << 22, weight_cache=False)
    want = llm.generate({"prompt_token_ids": prompt}, greedy(8))[0].outputs[0].text
    server = start_server(tmp_path, "--model", str(qwen2), "--device", "cuda", "--no-weight-cache")
    try:
        wait_healthy(server)
        name = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
        assert reply["choices"][0]["text"] == want
        assert f"engine core running in process {server.proc.pid}" in server.log()
    finally:
        stop(server)
