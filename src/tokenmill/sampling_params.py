"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's names and meanings)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class StructuredOutputsParams:
    """The one constraint a request's output must match (vLLM's StructuredOutputsParams): a JSON schema (`json`,
    a dict or its text), any JSON object (`json_object`), a regular expression, one of `choice`'s strings, or a
    grammar (Lark or GBNF text). Compiled and enforced by llguidance in the engine (engine/structured_output.py)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of json, json_object, regex, choice and grammar, "
                             f"got {given or 'none'}")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"structured_outputs choice must be a non-empty list of strings, got {self.choice!r}")


# Below this a temperature is greedy, as in vLLM (_SAMPLING_EPS): dividing logits by 1e-300 overflows to inf.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Validated on construction, so a bad value fails at the call site with the field's name."""

    n: int = 1
    best_of: int | None = None  # sample this many, return the n with the highest cumulative logprob
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
    prompt_logprobs: int | None = None  # the same for every prompt token (computed in one extra uncached pass)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # stop tokens (EOS, stop_token_ids) are banned until this many tokens are out
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] as OpenAI's
    bad_words: list[str] = field(default_factory=list)  # never generated (with or without a leading space)
    allowed_token_ids: list[int] | None = None  # only these may be generated
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self._check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        self._check(self.best_of is None or (isinstance(self.best_of, int) and self.best_of >= self.n), "best_of",
                    f"must be an integer >= n ({self.n})")
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
        self._check(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", "must be >= 0")
        self._check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        self._check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        self._check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
                    f"must be <= max_tokens ({self.max_tokens})")
        if self.logit_bias is not None:
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
            self._check(all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias",
                        "values must be in [-100, 100]")
        self.bad_words = list(self.bad_words)
        self._check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
                    "must be non-empty strings")
        self._check(self.allowed_token_ids is None or bool(self.allowed_token_ids), "allowed_token_ids",
                    "must not be empty")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)

    def _check(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def num_sequences(self) -> int:
        """Sequences the engine runs for one prompt: best_of of them when set, else n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def token_ids_in_range(self, vocab_size: int) -> None:
        """Token ids the caller named (logit_bias, allowed_token_ids, stop_token_ids) exist in the vocabulary."""
        for name in ("logit_bias", "allowed_token_ids", "stop_token_ids"):
            bad = [t for t in getattr(self, name) or () if not 0 <= int(t) < vocab_size]
            if bad:
                raise ValueError(f"{name} holds token ids outside [0, {vocab_size}): {bad[:5]}")
