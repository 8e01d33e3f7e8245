"""KL divergence of a model's next-token distributions under a test setting against a reference one (llama.cpp's
`perplexity --kl-divergence`): here a compressed KV cache against the float16 cache, both scored through the
cache in chunks, over the same sliding windows as perplexity (each token scored once)."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenmill.compress.perplexity import Scorer, sliding_windows


@dataclass
class KLDResult:
    mean: float  # mean KL(reference || test) per scored token, nats
    median: float
    p99: float
    max: float
    top1_agreement: float  # share of tokens where both distributions' most likely token is the same
    reference_perplexity: float
    test_perplexity: float
    num_tokens: int
    seconds: float

    @property
    def perplexity_change(self) -> float:
        """test / reference perplexity - 1."""
        return self.test_perplexity / self.reference_perplexity - 1


def kl_divergence(reference: Scorer, test: Scorer, ids: Sequence[int], context_len: int = 512, stride: int = 256,
                  progress: bool = False) -> KLDResult:
    started = time.perf_counter()
    klds, agree, nll_ref, nll_test = [], 0, 0.0, 0.0
    windows = sliding_windows(len(ids), context_len, stride)
    for w in tqdm(windows, desc="scoring", unit="window", disable=not progress):
        first = w.first_target - w.begin  # logits row r predicts token r + 1
        rows = slice(first - 1, w.end - w.begin - 1)
        ref = F.log_softmax(reference(ids[w.begin:w.end])[rows].float(), dim=-1)
        got = F.log_softmax(test(ids[w.begin:w.end])[rows].float(), dim=-1)
        klds.append((ref.exp() * (ref - got)).sum(-1))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        targets = torch.tensor(ids[w.first_target:w.end], dtype=torch.long)
        nll_ref -= ref.gather(-1, targets[:, None]).sum().item()
        nll_test -= got.gather(-1, targets[:, None]).sum().item()
    values = torch.cat(klds)
    n = len(values)
    return KLDResult(values.mean().item(), values.median().item(), values.quantile(0.99).item(), values.max().item(),
                     agree / n, math.exp(nll_ref / n), math.exp(nll_test / n), n, time.perf_counter() - started)
