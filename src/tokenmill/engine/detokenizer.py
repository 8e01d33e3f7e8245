"""Incremental detokenization with stop strings.

Decoding a growing id list token by token must not split multi-byte characters (a byte-level BPE
token can hold half an emoji) nor lose SentencePiece's leading spaces, so each step decodes a short
window of recent ids and emits only the part that is complete. Text that could be the start of a
stop string is held back from streaming until it is known not to be one (engine/stop_strings.py matches them).
"""
from __future__ import annotations

from collections.abc import Sequence

from tokenmill.engine.stop_strings import StopStrings
from tokenmill.model.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens, for correct leading spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] | StopStrings = (),
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False) -> None:
        """stop: the strings, or their automaton when several sequences share them (n > 1)."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop if isinstance(stop, StopStrings) or not stop else StopStrings(stop)
        self._stop_state = 0
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
        start = len(self.text)
        self.text += new_text
        if self.stop:
            self._stop_state, match = self.stop.feed(self._stop_state, new_text)
            if match is not None:
                end = start + match.end
                self.text = self.text[:end] if self.include_stop else self.text[:end - len(match.stop)]
                self.stopped_by = match.stop

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def stream_delta(self, finished: bool) -> str:
        """Text not yet handed out, keeping back the tail that might still become a stop string."""
        end = len(self.text)
        if not finished and self.stop:
            end = max(self._streamed, end - self.stop.pending(self._stop_state))
        delta = self.text[self._streamed:end]
        self._streamed = end
        return delta
