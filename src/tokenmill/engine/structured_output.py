"""Structured output: each sequence's matcher over a request's grammar (engine/grammar.py), whose mask of allowed
next tokens the sampler applies.

Why llguidance: one Rust wheel with no dependencies; it computes each step's mask on demand from an Earley parser
walking the tokenizer's token trie (no ahead-of-time automaton over the vocabulary, so a new schema costs
milliseconds, not seconds); JSON schema, regular expressions and Lark or GBNF grammars all go through it; llama.cpp
and vLLM (its "guidance" backend) use it. xgrammar, vLLM's default, pulls in triton and transformers;
outlines-core builds its whole index ahead.
"""
from __future__ import annotations

import functools

import llguidance
import torch

from tokenmill.engine.grammar import grammar_text
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.sampling_params import StructuredOutputsParams


class GrammarMatcher:
    """One sequence's place in its grammar: the tokens that may come next, advanced by each token chosen."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def allowed(self) -> torch.Tensor:
        """bool [vocab]: True where the token may come next."""
        return torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8) != 0

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False if the grammar does not allow it (the mask was not applied)."""
        return self._matcher.consume_token(token_id) and not self._matcher.is_error()

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of `token_ids` the grammar allows in a row from here (a draft is cut to those)."""
        return self._matcher.validate_tokens(token_ids)

    def masks_along(self, token_ids: list[int]) -> list[torch.Tensor]:
        """The mask before each of `token_ids` (which it must allow) and after the last: one per verified row,
        leaving the matcher where it was."""
        masks = []
        for token in token_ids:
            masks.append(self.allowed())
            self._matcher.consume_token(token)
        masks.append(self.allowed())
        self._matcher.rollback(len(token_ids))
        return masks

    @property
    def done(self) -> bool:
        """The output is complete: nothing more may follow."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Matchers for one tokenizer. llguidance's view of the vocabulary (every token's bytes) takes about a second
    to build, so it is built on the first constrained request, then kept."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's rows, which may pad past the tokenizer's vocabulary

    @functools.cached_property
    def _lltokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.LLTokenizer(self.tokenizer.backend_json(), n_vocab=self.vocab_size,
                                      eos_token=sorted(self.tokenizer.stop_token_ids))

    def matcher(self, spec: StructuredOutputsParams) -> GrammarMatcher:
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs cannot be enforced: {matcher.get_error()}")
        return GrammarMatcher(matcher)
