"""InputProcessor: a request's prompt and options -> a validated EngineCoreRequest, before the engine sees it.

Shared by the offline engine (LLM) and the server's API process, which holds this and the tokenizer only, not
the model: it tokenizes and validates while the engine core process steps, and every error is the caller's
(a 400) before anything reaches the core. The core builds each Request from the EngineCoreRequest, once.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.engine.grammar import grammar_text
from tokenmill.engine.messages import EngineCoreRequest
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams


@dataclass(frozen=True)
class InputProcessor:
    tokenizer: Tokenizer
    max_model_len: int  # the engine's (possibly lowered to what its KV cache holds)
    vocab_size: int
    hidden_size: int = 0  # an embedding's length

    def process(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                priority: int = 0) -> EngineCoreRequest:
        """Tokenize and validate; raises ValueError whose message starts with the bad field's name."""
        text, ids = self.prompt(prompt)
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise ValueError(f"logprobs must be <= the vocabulary size {self.vocab_size}, got {params.logprobs}")
        params.token_ids_in_range(self.vocab_size)
        if params.structured_outputs is not None:
            grammar_text(params.structured_outputs)  # compiled (and cached) here, so a bad one fails the caller
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(room, params.max_tokens)
        return EngineCoreRequest(request_id, text, ids, params, max_tokens, priority,
                                 bad_words_token_ids=self._bad_words(params.bad_words))

    def _bad_words(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """Each word's token ids as it would appear alone and after a space (vLLM's two spellings)."""
        spellings = {tuple(self.tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
                     for word in words for prefix in ("", " ")}
        return tuple(sorted(s for s in spellings if s))

    def prompt(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt, checked: not empty, ids in the vocabulary, room for a token."""
        text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        self._check_prompt(ids)
        return text, ids

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                             "at least one token must fit after it")
