"""Incremental detokenization with stop strings.

Decoding a growing id list token by token must not split multi-byte characters (a byte-level BPE
token can hold half an emoji) nor lose SentencePiece's leading spaces, so each step decodes a short
window of recent ids and emits only the part that is complete. Text that could be the start of a
stop string is held back from streaming until it is known not to be one.
"""
from __future__ import annotations

from collections.abc import Sequence

from tokenmill.model.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens, for correct leading spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = list(stop)
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop_str_in_output
        self.text = ""
        self.stopped_by: str | None = None  # the stop string that ended the text
        self._streamed = 0

    def add(self, token_id: int) -> None:
        """Append one generated token; sets `stopped_by` when the text now contains a stop string."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next token
        new_text = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new_text
        self._check_stop(len(new_text))

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _check_stop(self, new_chars: int) -> None:
        """Only the new characters (plus a stop string's length before them) can hold a new match."""
        hits = [(at, stop) for stop in self.stop
                if (at := self.text.find(stop, max(0, len(self.text) - new_chars - len(stop) + 1))) != -1]
        if hits:
            at, stop = min(hits)
            self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
            self.stopped_by = stop

    def stream_delta(self, finished: bool) -> str:
        """Text not yet handed out, keeping back a tail that might still become a stop string."""
        end = len(self.text)
        if not finished and self.stop:
            end = max(self._streamed, end - max(map(len, self.stop)) + 1)
        delta = self.text[self._streamed:end]
        self._streamed = end
        return delta
