"""transformers as the oracle: load a GGUF with its own loader and dequantizer, greedy tokens, logits."""
from __future__ import annotations

from pathlib import Path

import torch

from tokenmill import SamplingParams


def hf_gguf_model(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
