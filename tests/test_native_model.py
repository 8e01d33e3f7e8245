"""The default model served natively quantized: packed layers everywhere, memory near the file size, and
greedy output close to the exact float32 path (the agreement is reported, not assumed)."""
from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.kernels import native, quant_ops
from tokenmill.model.build import weight_bytes_per_token
from tokenmill.model.layers.quantized import QuantizedEmbedding, QuantizedLinear

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def native_llm() -> LLM:
    return LLM()


def test_default_gguf_runs_on_packed_layers(native_llm):
    linears = [m for m in native_llm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears, "every linear layer of a Q4_1/Q8_0 GGUF should be packed"
    assert isinstance(native_llm.model.embed_tokens, QuantizedEmbedding)
    assert native_llm.model.lm_head.parts[0].weight is native_llm.model.embed_tokens.weight  # tied, one copy
    assert native_llm.dtype == torch.float32  # packed kernels take float32 activations


def test_weights_streamed_per_token_match_the_file(native_llm):
    ckpt = native_llm.checkpoint
    linear = sum(w.nbytes for name, w in ckpt.weights.items() if name.endswith("proj.weight"))
    head = ckpt.weights["embed_tokens.weight"].nbytes
    assert weight_bytes_per_token(native_llm.model) == linear + head
    assert linear + head <= ckpt.size_bytes  # about the file size, not 4x it as float32


@pytest.mark.skipif(not quant_ops.available(), reason="native kernels need an AVX2 CPU and g++")
def test_kernel_and_dequantized_gemm_agree_on_the_same_layer(native_llm, monkeypatch):
    layer = native_llm.model.layers[0].mlp.gate_up_proj
    assert isinstance(layer, QuantizedLinear) and layer.max_kernel_rows >= 40
    x = torch.randn(40, layer.in_features)
    kernel = layer(x)
    monkeypatch.setattr(layer, "max_kernel_rows", 0)
    gemm = layer(x)  # dequantize + float GEMM
    assert (kernel - gemm).abs().max() <= 0.02 * gemm.abs().max()


@pytest.mark.slow
def test_native_greedy_agreement_with_float32_is_reported(native_llm, capsys):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    exact = [o.outputs[0].token_ids for o in LLM(dtype="float32").generate(PROMPTS, params)]
    packed = [o.outputs[0].token_ids for o in native_llm.generate(PROMPTS, params)]
    agree = [next((i for i, (a, b) in enumerate(zip(e, p)) if a != b), len(e)) for e, p in zip(exact, packed)]
    with capsys.disabled():
        print(f"\nnative Q4_1 vs float32: greedy tokens agree for the first {agree} of 32 tokens")
    assert all(p[0] == e[0] for e, p in zip(exact, packed))  # the first token: a large logit margin on these prompts


@pytest.mark.skipif(not native.available(), reason="native kernels need an AVX2 CPU and g++")
def test_float32_native_layer_kernels_keep_greedy_tokens(monkeypatch):
    llm = LLM(dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with_kernels = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", "0")
    native.library.cache_clear()
    try:
        assert not native.available()
        plain = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    finally:
        monkeypatch.delenv("TOKENMILL_NATIVE_KERNELS")
        native.library.cache_clear()
    assert with_kernels == plain
