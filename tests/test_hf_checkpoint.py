"""Hugging Face checkpoint directories: a small random Llama written by transformers (sharded safetensors)
must give transformers' logits and greedy tokens when loaded by tokenmill."""
from __future__ import annotations

import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokenmill import LLM, SamplingParams

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm sun until 5 o'clock."
NEW_TOKENS = 12
# Both sides run float32 on the same weights; at this size the logits (magnitude ~4) came out bit-identical.
# The tolerance only leaves room for a different summation order (fused GEMMs, other attention kernels);
# forgetting the rope scaling or using the wrong theta moves logits by far more (checked in the llama3 test).
ATOL = 1e-5

BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
            vocab_size=49152, max_position_embeddings=256, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _write_checkpoint(folder, tokenizer_dir, seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**BASE, **overrides})).eval()
    model.save_pretrained(str(folder), max_shard_size="5MB")
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1, "the checkpoint should be sharded"
    return model


def _our_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    return llm.score(ids)


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def _check_against_transformers(folder, model) -> LLM:
    llm = LLM(model=str(folder), dtype="float32")
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > 16
    ours, theirs = _our_logits(llm, ids), _hf_logits(model, ids)
    assert ours.shape == theirs.shape == (len(ids), BASE["vocab_size"])
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    out = llm.generate({"prompt_token_ids": ids},
                       SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == _hf_greedy(model, ids)
    return llm


def test_sharded_untied_checkpoint_matches_transformers(tmp_path, tokenizer_dir):
    model = _write_checkpoint(tmp_path, tokenizer_dir, seed=0, tie_word_embeddings=False)
    llm = _check_against_transformers(tmp_path, model)
    cfg = llm.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert not cfg.tie_word_embeddings and cfg.rope_scaling is None
    assert llm.checkpoint.format == "safetensors"
    assert not torch.equal(llm.model.lm_head.weight, llm.model.embed_tokens.weight)
    torch.testing.assert_close(llm.model.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)


def test_llama3_rope_scaling_tied_checkpoint_matches_transformers(tmp_path, tokenizer_dir):
    model = _write_checkpoint(tmp_path, tokenizer_dir, seed=1, tie_word_embeddings=True,
                              rope_parameters=dict(LLAMA3_ROPE))
    llm = _check_against_transformers(tmp_path, model)
    cfg = llm.config
    assert cfg.tie_word_embeddings and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3" and cfg.rope_scaling.factor == 8.0
    assert llm.model.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()

    # the scaling is not a no-op at this length: the same weights without it give clearly different logits
    plain = LlamaForCausalLM(LlamaConfig(**{
        **BASE, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})).eval()
    plain.load_state_dict(model.state_dict())
    ids = llm.tokenizer.encode(TEXT)
    assert (_hf_logits(plain, ids) - _hf_logits(model, ids)).abs().max() > 1000 * ATOL


def test_legacy_rope_scaling_key(tmp_path, tokenizer_dir):
    """Configs written before transformers 5 keep `rope_theta` and `rope_scaling` at the top level."""
    import json

    model = _write_checkpoint(tmp_path, tokenizer_dir, seed=2, tie_word_embeddings=True,
                              rope_parameters=dict(LLAMA3_ROPE))
    config_file = tmp_path / "config.json"
    raw = json.loads(config_file.read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    config_file.write_text(json.dumps(raw))
    llm = LLM(model=str(tmp_path), dtype="float32")
    assert llm.config.rope_theta == 500000.0 and llm.config.rope_scaling.kind == "llama3"
    ids = llm.tokenizer.encode(TEXT)
    torch.testing.assert_close(_our_logits(llm, ids), _hf_logits(model, ids), atol=ATOL, rtol=0)
