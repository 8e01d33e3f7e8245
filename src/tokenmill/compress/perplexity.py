"""Perplexity of a model on a long text with a sliding window (as in Hugging Face's perplexity guide).

Every token after the first is scored exactly once. The first window scores its tokens 1..context_len-1; each
later window moves `stride` tokens on, scores only those new tokens and sees the `context_len - stride` before
them as context, so each token is predicted from up to `context_len` tokens without any KV cache.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenmill.texts import shipped_text

Scorer = Callable[[Sequence[int]], torch.Tensor]  # token ids -> logits [len, vocab] at every position


def read_text(path: str | Path | None, default: str) -> str:
    """The file's text, or the shipped `default` text when no path is given."""
    if path is None:
        return shipped_text(default)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read text file {str(path)!r}: {exc}") from exc
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    first_target: int  # first token scored; the ones before it in the window are context only


def sliding_windows(num_tokens: int, context_len: int, stride: int) -> list[Window]:
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2, got {context_len}")
    if not 1 <= stride < context_len:
        raise ValueError(f"stride must be in [1, context_len - 1] = [1, {context_len - 1}], got {stride}")
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {num_tokens}")
    windows, begin, scored = [], 0, 1
    while scored < num_tokens:
        end = min(begin + context_len, num_tokens)
        windows.append(Window(begin, end, scored))
        scored, begin = end, begin + stride
    return windows


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    num_tokens: int  # tokens scored
    num_windows: int
    context_len: int
    stride: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")


def perplexity(score: Scorer, ids: Sequence[int], context_len: int = 512, stride: int = 256,
               progress: bool = False) -> PerplexityResult:
    windows = sliding_windows(len(ids), context_len, stride)
    started = time.perf_counter()
    total, count = 0.0, 0
    for w in tqdm(windows, desc="scoring", unit="window", disable=not progress):
        logits = score(ids[w.begin:w.end])
        first = w.first_target - w.begin  # logits row r predicts token r + 1
        targets = torch.tensor(ids[w.first_target:w.end], dtype=torch.long)
        total += F.cross_entropy(logits[first - 1:-1].float(), targets, reduction="sum").item()
        count += len(targets)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(windows), context_len, stride,
                            time.perf_counter() - started)
