"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's names and meanings)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this a temperature is greedy, as in vLLM (_SAMPLING_EPS): dividing logits by 1e-300 overflows to inf.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Validated on construction, so a bad value fails at the call site with the field's name."""

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives to report besides the chosen token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self._check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        self._check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
                    "max_tokens", "must be an integer >= 1")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            self._check(isinstance(value, (int, float)) and math.isfinite(value), name, "must be a finite number")
        self._check(self.temperature >= 0, "temperature", "must be >= 0")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1 (disabled) or >= 0")
        self._check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        self._check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        self._check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        self._check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        self._check(self.logprobs is None or self.logprobs >= 0, "logprobs", "must be >= 0")
        self._check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")

    def _check(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
