"""ModelRunner: turns the scheduler's chunks into flat input tensors + attention metadata, runs the model.

It reads requests and block tables but changes neither; the scheduler and the KV manager own those.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.cache.kv_cache import KVCache
from tokenmill.engine.scheduler import ScheduledChunk
from tokenmill.model.layers.paged_attention import AttentionMetadata, PrefillSpan
from tokenmill.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size

    @torch.inference_mode()
    def execute(self, chunks: Sequence[ScheduledChunk], block_tables: dict[str, list[int]]) -> torch.Tensor:
        """Logits [chunks that sample, vocab] for the last token of each chunk reaching its sequence's end."""
        ids, positions, slots, logits_rows = [], [], [], []
        meta = AttentionMetadata(slot_mapping=None)
        decode_tables, decode_lens = [], []
        row = 0
        for chunk in chunks:
            request, n = chunk.request, chunk.num_tokens
            start = request.num_computed_tokens
            table = torch.tensor(block_tables[request.request_id], dtype=torch.long)
            pos = torch.arange(start, start + n)
            ids.extend(request.token_ids[start:start + n])
            positions.append(pos)
            slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            if n == 1:
                assert not meta.prefills, "the scheduler orders single-token chunks first"
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                meta.prefills.append(PrefillSpan(row, n, start + n, table))
            row += n
            if chunk.samples:
                logits_rows.append(row - 1)
        meta.slot_mapping = torch.cat(slots)
        if decode_tables:
            self._add_decode_metadata(meta, decode_tables, decode_lens)
        logits = self.model(torch.tensor(ids), torch.cat(positions), self.kv_cache, meta,
                            torch.tensor(logits_rows, dtype=torch.long))
        return logits

    def _add_decode_metadata(self, meta: AttentionMetadata, tables: list[torch.Tensor], lengths: list[int]) -> None:
        width = max(len(t) for t in tables)
        padded = torch.zeros(len(tables), width, dtype=torch.long)
        for i, t in enumerate(tables):
            padded[i, : len(t)] = t
        meta.num_decode_tokens = len(tables)
        meta.decode_block_tables = padded
        lens = torch.tensor(lengths)
        meta.decode_seq_lens = lens
        meta.decode_mask = (torch.arange(width * self.block_size)[None, :] < lens[:, None])[:, None, None, :]

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits [len, vocab] at every position of one sequence, computed in one pass without caching."""
        n = len(token_ids)
        meta = AttentionMetadata(slot_mapping=None, prefills=[PrefillSpan(0, n, n, torch.empty(0, dtype=torch.long))])
        return self.model(torch.tensor(token_ids), torch.arange(n), self.kv_cache, meta)
