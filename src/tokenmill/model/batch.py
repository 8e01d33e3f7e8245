"""StepBatch: what one forward pass computes, as plain data (no engine objects below the engine).

The scheduler builds it from its chunks; the runner reads it (both its paths flatten it the same way, here,
once); the engine and the speculator find each sampling chunk's logit rows in it. A chunk is one sequence's
run of consecutive positions: a prompt chunk, a decode token, or a decode token followed by draft tokens
(a verify chunk). Draft models build their own StepBatch for their own cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BatchChunk:
    token_ids: list[int]  # tokens computed this step (drafts last)
    start: int  # position of token_ids[0]; the sequence's KV before it is cached
    block_tables: list[list[int]]  # the sequence's block table in each KV group (cache/kv_layout.py)
    num_drafts: int = 0  # trailing draft tokens: each gets a logit row, as does the token before them
    samples: bool = True  # the chunk reaches the sequence's last token, so its last 1 + num_drafts rows give logits

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """One query per token attending to its own prefix (a decode or verify chunk), not a prompt chunk."""
        return self.num_tokens == 1 or self.num_drafts > 0


@dataclass
class StepBatch:
    chunks: list[BatchChunk]  # decode and verify chunks first, then prompt chunks (the module path needs it)
    token_ids: list[int] = field(init=False)
    positions: list[int] = field(init=False)
    logits_rows: list[int] = field(init=False)  # flat token rows whose logits the step returns, in order
    first_logit_row: list[int | None] = field(init=False)  # per chunk: its first row in the returned logits

    def __post_init__(self) -> None:
        self.token_ids, self.positions, self.logits_rows, self.first_logit_row = [], [], [], []
        for chunk in self.chunks:
            self.token_ids += chunk.token_ids
            self.positions += range(chunk.start, chunk.end)
            if chunk.samples:
                self.first_logit_row.append(len(self.logits_rows))
                self.logits_rows += range(len(self.positions) - 1 - chunk.num_drafts, len(self.positions))
            else:
                self.first_logit_row.append(None)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
