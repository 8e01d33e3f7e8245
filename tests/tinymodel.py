"""A tiny random Llama written by transformers (with the default model's tokenizer), for fast quantization tests."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokenmill.model.tokenizer import Tokenizer

TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=256,
            vocab_size=49152, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=True)


def write_tiny_llama(folder: Path, tokenizer: Tokenizer, seed: int = 0, outlier_scale: float = 0.0,
                     **overrides) -> LlamaForCausalLM:
    """With `outlier_scale`, 4 random channels of every RMSNorm weight are set to it: a few input channels of
    q/k/v and gate/up then carry activations that large, like the outlier features of trained LLMs."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    if outlier_scale:
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[torch.randperm(norm.weight.numel())[:4]] = outlier_scale
    model.save_pretrained(str(folder))
    tokenizer.save(folder)
    return model
