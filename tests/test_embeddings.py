"""Embeddings from the loaded model (LLM.embed; the server's /v1/embeddings): one hidden_size vector per prompt,
L2-normalized, mean-pooled final hidden states equal to pooling the model's own hidden states by hand, and
paraphrases closer to each other than to unrelated sentences."""
from __future__ import annotations

import pytest
import torch

PAIRS = [("The cat sat on the mat.", "A cat was sitting on the mat."),
         ("How do I bake bread at home?", "What is a good recipe for homemade bread?"),
         ("The stock market fell sharply today.", "Share prices dropped steeply on Monday.")]


def test_shape_norm_and_pooling(llm_f32):
    out = llm_f32.embed(["Hello world", "Goodbye"])
    assert len(out) == 2
    for o in out:
        vector = torch.tensor(o.outputs.embedding)
        assert vector.shape == (llm_f32.config.hidden_size,)
        assert float(vector.norm()) == pytest.approx(1.0, abs=1e-5)
    ids = out[0].prompt_token_ids
    runner = llm_f32.engine.runner
    with torch.inference_mode():
        hidden = llm_f32.model.norm(llm_f32.model.hidden_states(*runner.uncached_inputs(ids))).float()
    mean = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
    last = torch.nn.functional.normalize(hidden[-1], dim=-1)
    assert torch.allclose(torch.tensor(out[0].outputs.embedding), mean, atol=1e-5)
    assert torch.allclose(torch.tensor(llm_f32.embed("Hello world", pooling="last")[0].outputs.embedding), last,
                          atol=1e-5)


def test_paraphrases_are_closer_than_unrelated_sentences(llm_f32):
    vectors = [torch.tensor(o.outputs.embedding) for o in llm_f32.embed([s for pair in PAIRS for s in pair])]
    for i in range(len(PAIRS)):
        a, b = vectors[2 * i], vectors[2 * i + 1]
        same = float(a @ b)
        for j in range(len(PAIRS)):
            if j != i:
                assert same > float(a @ vectors[2 * j]) and same > float(a @ vectors[2 * j + 1]), (PAIRS[i], PAIRS[j])


def test_bad_pooling_and_empty_prompt(llm_f32):
    with pytest.raises(ValueError, match="pooling"):
        llm_f32.embed("x", pooling="max")
    with pytest.raises(ValueError, match="prompt is empty"):
        llm_f32.embed([[]])
