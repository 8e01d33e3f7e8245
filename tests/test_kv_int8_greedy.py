"""An int8 KV cache on the real default model, greedy on the reference prompts, against the float32 cache: its
tokens must follow float32's about as long as the float16 cache's do. The default model is sensitive to any
rounding in its cache (its kernels quantize activations to int8 per row): float16 alone departs from float32 at
the first or second token on some prompts, so equality with float16 token for token cannot be asked; the float16
run is the yardstick (measured on Zen 4: mean first divergence 30.7 of 64 steps for float16, 18.5 for int8)."""
from __future__ import annotations

import statistics

import pytest

from test_reference_greedy import ALL, NUM_TOKENS, _prompt_ids
from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow


def test_int8_cache_follows_float32_about_as_long_as_float16(record_property):
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    runs = {}
    for dtype in ("float32", "float16", "int8"):
        llm = LLM(kv_cache_dtype=dtype)
        runs[dtype] = [llm.generate({"prompt_token_ids": _prompt_ids(llm, prompt, chat)}, params)[0].outputs[0]
                       for prompt, chat in ALL]

    def agreement(dtype: str) -> list[int]:
        """Per prompt, the step at which `dtype`'s tokens first differ from float32's (NUM_TOKENS: never)."""
        return [next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), NUM_TOKENS)
                for a, b in zip(runs[dtype], runs["float32"])]

    half, int8 = agreement("float16"), agreement("int8")
    record_property("first_divergence", f"float16 {half}, int8 {int8}")
    print(f"first divergence from float32 (of {NUM_TOKENS}): float16 {half}, int8 {int8}")
    assert statistics.mean(int8) >= 0.5 * statistics.mean(half)
