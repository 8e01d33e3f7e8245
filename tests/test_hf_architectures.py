"""Qwen2 and Gemma 3 checkpoint directories: small random models written by transformers must give its logits and
greedy tokens, on the paged engine too (sliding windows across chunked prefill, decode, prefix caching)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

from hf_reference import greedy, hf_greedy, hf_logits
from tokenmill import LLM
from tokenmill.errors import UnsupportedModelError

ATOL = 1e-5  # float32 on both sides; see test_hf_checkpoint.py
VOCAB = 49152  # the default model's tokenizer is copied in; prompts are token ids
PROMPT = [(i * 7919) % 40000 + 100 for i in range(40)]
WINDOW, BLOCK = 8, 4
GEMMA = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
             vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.1, query_pre_attn_scalar=24,
             final_logit_softcapping=3.0)


def _save(folder, model, tokenizer_dir) -> None:
    model.save_pretrained(str(folder))
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)


def _randomize(model, pattern: str, std: float) -> None:
    """transformers initializes biases and norm weights to constants; random ones catch a missed term."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.normal_(0, std)


def small_qwen2(folder, tokenizer_dir, hidden_size: int = 64) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 (4 heads, 2 KV heads, FFN twice the width) with random biases, saved in `folder`."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=hidden_size, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=2 * hidden_size, vocab_size=VOCAB,
                                         max_position_embeddings=256, initializer_range=0.1)).eval()
    _randomize(model, "bias", 0.5)
    _save(folder, model, tokenizer_dir)
    return model


def test_qwen2_checkpoint_matches_transformers(tmp_path, tokenizer_dir):
    model = small_qwen2(tmp_path, tokenizer_dir)
    llm = LLM(str(tmp_path), dtype="float32")
    cfg = llm.config
    assert cfg.architecture == "qwen2" and cfg.attention_bias and not cfg.attention_out_bias
    assert not cfg.tie_word_embeddings and cfg.layer_types == ("full_attention",) * 2
    torch.testing.assert_close(llm.score(PROMPT), hf_logits(model, PROMPT), atol=ATOL, rtol=0)
    out = llm.generate({"prompt_token_ids": PROMPT}, greedy(12))[0].outputs[0].token_ids
    assert out == hf_greedy(model, PROMPT, 12)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, tokenizer_dir):
    """13 layers (2 global: KV groups of 2 slots, the last sliding group half used), window 8, random norms."""
    torch.manual_seed(1)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA, num_hidden_layers=13, sliding_window=WINDOW)).eval()
    _randomize(model, "norm", 0.5)
    folder = tmp_path_factory.mktemp("gemma3")
    _save(folder, model, tokenizer_dir)
    # chunks of 12 tokens: longer than the window, and following cached tokens after the first
    llm = LLM(str(folder), dtype="float32", block_size=BLOCK, max_num_batched_tokens=13)
    return model, llm


def test_gemma3_checkpoint_matches_transformers(gemma):
    model, llm = gemma
    cfg = llm.config
    assert cfg.architecture == "gemma3" and cfg.qk_norm and cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.sliding_window == WINDOW and cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1e6
    assert cfg.layer_types.count("full_attention") == 2 and llm.engine.kv_cache.layout.slots == 2
    ours, theirs = llm.score(PROMPT), hf_logits(model, PROMPT)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert theirs.abs().max() < GEMMA["final_logit_softcapping"]  # the cap is in play

    # the window is not a no-op at this length: the same weights attending everywhere give other logits
    wide = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA, num_hidden_layers=13, sliding_window=512)).eval()
    wide.load_state_dict(model.state_dict())
    assert (hf_logits(wide, PROMPT) - theirs).abs().max() > 1000 * ATOL


def test_gemma3_engine_greedy_with_bounded_sliding_blocks(gemma):
    """Chunked prefill of a 40-token prompt then 30 decodes: the tokens are transformers', the global group
    holds every block while after each step a sliding group keeps only the blocks the next window spans."""
    model, llm = gemma
    engine = llm.engine
    engine.add_request("a", PROMPT, greedy(30))
    sliding = [g for g, w in enumerate(engine.kv_cache.layout.windows) if w is not None]
    tokens: list[int] = []
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
        steps += 1
        if engine.has_unfinished():
            held = engine.kv_manager.held_blocks("a")
            computed = engine.scheduler.running[0].num_computed_tokens
            assert held[-1] == -(-computed // BLOCK)  # the global group: every block
            assert max(held[g] for g in sliding) <= (WINDOW - 2) // BLOCK + 2  # 3: keys computed - 7 .. computed - 1
    assert steps == 4 + 29  # 40 prompt tokens in chunks of 13 (the 4th samples), then 29 decodes
    assert tokens == hf_greedy(model, PROMPT, 30)
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.num_blocks


def test_gemma3_prefix_cache_hits_with_sliding_groups(gemma):
    """A second request sharing 30 tokens reuses 7 blocks in every group and decodes the same tokens."""
    model, llm = gemma
    second = PROMPT[:30] + [7, 8, 9, 10, 11]
    first_out = llm.generate({"prompt_token_ids": PROMPT}, greedy(4))[0]
    out = llm.generate({"prompt_token_ids": second}, greedy(8))[0]
    assert first_out.outputs[0].token_ids == hf_greedy(model, PROMPT, 4)
    assert out.num_cached_tokens == 28
    assert out.outputs[0].token_ids == hf_greedy(model, second, 8)


def test_unsupported_attention_softcapping_is_refused(tmp_path):
    """Gemma 2-style attention-score softcapping would be silently ignored; it is refused, naming the field."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"],
                                                      "attn_logit_softcapping": 50.0}))
    with pytest.raises(UnsupportedModelError, match="attn_logit_softcapping"):
        LLM(str(tmp_path), dtype="float32")
