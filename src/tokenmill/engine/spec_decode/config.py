"""SpeculativeConfig: vLLM's `speculative_config` dict, validated, with errors that name the bad field."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from tokenmill.config import QUANTIZATION_METHODS

METHODS = ("ngram", "suffix", "draft_model", "mix")
MIX_METHODS = ("suffix", "ngram")  # what "mix" chooses between, per request (the model-free proposers)
# fields that belong to one method: given with another, they would be silently ignored, so they are refused
METHOD_FIELDS = {
    "ngram": ("prompt_lookup_min", "prompt_lookup_max"),
    "suffix": ("suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests",
               "suffix_decoding_max_spec_factor", "suffix_decoding_min_token_prob"),
    "draft_model": ("model", "quantization", "num_layers"),
}
MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class SpeculativeConfig:
    """method "ngram" (prompt lookup), "suffix" (suffix decoding: the request's own tokens and recent requests'
    outputs, suffix.py), "draft_model" (a smaller model sharing the target's vocabulary) or "mix" (suffix and
    ngram both ready, each request drafted by the one whose drafts it has accepted best; their fields apply).

    mode: "auto" proposes per request and per step only what measured step times say pays off; "always"
    proposes `num_speculative_tokens` every step; "never" loads the proposer but never speculates (A/B runs).
    draft_model: `model` (None: the target's own checkpoint), optional `quantization` and `num_layers`
    (keep only the first layers: a cheap self-draft).
    suffix (vLLM's names): max_tree_depth bounds match plus draft length; max_cached_requests finished requests'
    outputs are searched too (0: only the request's own tokens); a draft is at most max_spec_factor x the match
    length and stops where the continuation's estimated probability falls below min_token_prob.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    model: str | None = None
    quantization: str | None = None
    num_layers: int | None = None
    mode: str = "auto"
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1)
        _check_int("prompt_lookup_min", self.prompt_lookup_min, 1)
        _check_int("prompt_lookup_max", self.prompt_lookup_max, 1)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if self.mode not in MODES:
            raise ValueError(f"speculative_config.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check_int("suffix_decoding_max_tree_depth", self.suffix_decoding_max_tree_depth, 2)
        _check_int("suffix_decoding_max_cached_requests", self.suffix_decoding_max_cached_requests, 0)
        for name in ("suffix_decoding_max_spec_factor", "suffix_decoding_min_token_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"speculative_config.{name} must be a number >= 0, got {value!r}")
        if self.suffix_decoding_min_token_prob > 1:
            raise ValueError("speculative_config.suffix_decoding_min_token_prob must be <= 1, "
                             f"got {self.suffix_decoding_min_token_prob!r}")
        if self.method != "draft_model":
            for name in METHOD_FIELDS["draft_model"]:
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config.{name} is for method 'draft_model', not {self.method!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"speculative_config.model must be a path or model name, got {self.model!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"speculative_config.quantization must be one of {', '.join(QUANTIZATION_METHODS)} "
                             f"or null, got {self.quantization!r}")
        if self.num_layers is not None:
            _check_int("num_layers", self.num_layers, 1)

    @property
    def proposer_methods(self) -> tuple[str, ...]:
        """The proposers this config runs: both of MIX_METHODS for "mix", else its method."""
        return MIX_METHODS if self.method == "mix" else (self.method,)

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """A config, a dict or its JSON text (the CLI's --speculative-config); None stays None (no speculation)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            # ValueError like every other bad field, so callers (CLI, server) catch one type
            raise ValueError(f"speculative_config must be a dict (JSON object), got {type(value).__name__}")  # noqa: TRY004
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        for name in ("method", "num_speculative_tokens"):
            if name not in value:
                raise ValueError(f"speculative_config.{name} is required")
        for method, names in METHOD_FIELDS.items():
            for name in names:
                if name in value and value["method"] not in (method, "mix" if method in MIX_METHODS else method):
                    raise ValueError(f"speculative_config.{name} is for method {method!r}, not {value['method']!r}")
        return cls(**value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"speculative_config.{name} must be an int >= {minimum}, got {value!r}")
