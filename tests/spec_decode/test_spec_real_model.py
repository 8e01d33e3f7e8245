"""The real default model: greedy tokens identical with and without speculation (slow)."""
from __future__ import annotations

import pytest

from spec_cases import all_free
from tokenmill import SamplingParams
from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.spec_decode.config import SpeculativeConfig

REWRITE = ("Rewrite the following text, keeping its wording:\n\nThe history of computing is a story of abstraction "
           "layered on abstraction. Early machines were programmed by rewiring panels; then came stored programs, "
           "assemblers, compilers and operating systems. Each layer hid the one below it.")


@pytest.mark.slow
@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    {"method": "draft_model", "num_speculative_tokens": 3, "num_layers": 10, "mode": "always"},
], ids=["ngram", "draft-10-layers"])
def test_default_model_greedy_identical_with_speculation(llm_f32, spec):
    """The real default model (float32), input-grounded and open prompts batched: the same greedy tokens."""
    from tokenmill.engine.spec_decode.draft_model import load_draft_model

    config = SpeculativeConfig.parse(spec)
    draft, draft_dtype = (load_draft_model(config, None, llm_f32.dtype, llm_f32.config.vocab_size)
                          if config.method == "draft_model" else (None, None))
    engine = LLMEngine(llm_f32.model, llm_f32.tokenizer, llm_f32.dtype, CacheConfig(), SchedulerConfig(),
                       config, draft, draft_dtype)
    prompts = [llm_f32.tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                                     tokenize=True)
               for c in (REWRITE, "Write a haiku about the sea.", REWRITE.replace("Rewrite", "Summarize"))]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm_f32.generate([{"prompt_token_ids": p} for p in prompts], params)]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert [done[str(i)] for i in range(3)] == expected
    assert engine.stats().spec_num_accepted_tokens > 0
    all_free(engine)
