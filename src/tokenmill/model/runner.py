"""ModelRunner: turns the scheduler's chunks into flat input tensors + attention metadata, runs the model.

It reads requests and block tables but changes neither; the scheduler and the KV manager own those.
Token ids and positions are shared by all layers; attention metadata is built once per KV group (see
cache/kv_layout.py), since each group has its own block tables and window. A sliding-window group's tables
are cut to the blocks the chunk can see, so local layers gather and attend over the window only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.cache.kv_cache import KVCache
from tokenmill.engine.scheduler import ScheduledChunk
from tokenmill.model.fused_decode import FusedDecoder
from tokenmill.model.layers.paged_attention import AttentionMetadata, PrefillSpan
from tokenmill.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.windows = kv_cache.layout.windows
        self.fused = FusedDecoder.build(model, kv_cache)

    @torch.inference_mode()
    def execute(self, chunks: Sequence[ScheduledChunk], block_tables: dict[str, list[list[int]]]) -> torch.Tensor:
        """Logits for the last token of each chunk reaching its sequence's end, and for each of its draft tokens
        (a verify chunk of d drafts gives d + 1 rows, in order): [sum over sampling chunks of 1 + drafts, vocab].

        `block_tables[request_id][group]`: the request's table in each KV group."""
        if self.fused is not None and sum(c.num_tokens for c in chunks) <= self.fused.max_rows:
            return self._fused_step(chunks, block_tables)
        ids, positions, logits_rows = [], [], []
        row = 0
        for chunk in chunks:
            request, n = chunk.request, chunk.num_tokens
            start = request.num_computed_tokens
            ids.extend(chunk.input_ids())
            positions.append(torch.arange(start, start + n))
            row += n
            if chunk.samples:
                logits_rows.extend(range(row - 1 - len(chunk.draft_token_ids), row))
        masks: dict[int | None, torch.Tensor] = {}  # decode masks depend only on the window: shared by groups
        meta = [self._group_metadata(g, window, chunks, block_tables, masks) for g, window in enumerate(self.windows)]
        return self.model(torch.tensor(ids), torch.cat(positions), self.kv_cache, meta,
                          torch.tensor(logits_rows, dtype=torch.long))

    def _fused_step(self, chunks: Sequence[ScheduledChunk], block_tables: dict[str, list[list[int]]]) -> torch.Tensor:
        """A step through the native decoder stack: every token is one row that attends to its own prefix (the
        rows of a prefill or verify chunk see the rows before them, written first; they attend as one run, see
        kernels/csrc/paged_attention.cpp). Metadata is built from plain lists (no masks)."""
        bs = self.block_size
        ids, positions, logits_rows = [], [], []
        for chunk in chunks:
            start = chunk.request.num_computed_tokens
            ids += chunk.input_ids()
            positions += range(start, start + chunk.num_tokens)
            if chunk.samples:
                logits_rows += range(len(positions) - 1 - len(chunk.draft_token_ids), len(positions))
        groups = []
        for g, window in enumerate(self.windows):
            tables, lens, slots = [], [], []
            for chunk in chunks:
                start, n = chunk.request.num_computed_tokens, chunk.num_tokens
                full = block_tables[chunk.request.request_id][g]
                first = self._first_visible_block(start, window)
                table = full[first:(start + n - 1) // bs + 1]
                for pos in range(start, start + n):
                    tables.append(table)
                    lens.append(pos + 1 - first * bs)
                    slots.append(full[pos // bs] * bs + pos % bs)
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]
            groups.append((torch.tensor(padded), torch.tensor(lens), torch.tensor(slots)))
        x = self.model.embed(torch.tensor(ids))
        self.fused.run(x, torch.tensor(positions), groups)
        return self.model.logits(x if len(logits_rows) == len(ids) else x[logits_rows])

    def _first_visible_block(self, start: int, window: int | None) -> int:
        """The first block a chunk starting at position `start` can see (0 without a sliding window)."""
        return 0 if window is None else max(0, start - window + 1) // self.block_size

    def _group_metadata(self, group: int, window: int | None, chunks: Sequence[ScheduledChunk],
                        block_tables: dict[str, list[list[int]]], masks: dict) -> AttentionMetadata:
        bs = self.block_size
        meta = AttentionMetadata(slot_mapping=None, window=window)
        slots, decode_tables, decode_starts, decode_lens = [], [], [], []
        row = 0
        for chunk in chunks:
            start, n = chunk.request.num_computed_tokens, chunk.num_tokens
            end = start + n
            first = self._first_visible_block(start, window)
            table = torch.tensor(block_tables[chunk.request.request_id][group][first:-(-end // bs)], dtype=torch.long)
            pos = torch.arange(start, end)
            slots.append(table[pos // bs - first] * bs + pos % bs)
            if n == 1 or chunk.draft_token_ids:  # a verify chunk: one decode query per token, each seeing its prefix
                assert not meta.prefills, "the scheduler orders single-token and verify chunks first"
                decode_tables += [table] * n
                decode_starts += [first * bs] * n
                decode_lens += range(start + 1, end + 1)
            else:
                meta.prefills.append(PrefillSpan(row, n, end, table, first * bs))
            row += n
        meta.slot_mapping = torch.cat(slots)
        if decode_tables:
            self._add_decode_metadata(meta, decode_tables, decode_starts, decode_lens, masks)
        return meta

    def _add_decode_metadata(self, meta: AttentionMetadata, tables: list[torch.Tensor], key_starts: list[int],
                             lengths: list[int], masks: dict) -> None:
        width = max(len(t) for t in tables)
        padded = torch.zeros(len(tables), width, dtype=torch.long)
        for i, t in enumerate(tables):
            padded[i, : len(t)] = t
        meta.num_decode_tokens = len(tables)
        meta.decode_block_tables = padded
        meta.decode_seq_lens = torch.tensor(lengths) - torch.tensor(key_starts)
        if meta.window not in masks:
            key_pos = torch.tensor(key_starts)[:, None] + torch.arange(width * self.block_size)[None, :]
            lens = torch.tensor(lengths)[:, None]
            mask = key_pos < lens
            if meta.window is not None:
                mask &= key_pos >= lens - meta.window
            masks[meta.window] = mask[:, None, None, :]
        meta.decode_mask = masks[meta.window]

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits [len, vocab] at every position of one sequence, computed in one pass without caching."""
        n = len(token_ids)
        span = PrefillSpan(0, n, n, torch.empty(0, dtype=torch.long))
        meta = [AttentionMetadata(slot_mapping=None, prefills=[span], window=w) for w in self.windows]
        return self.model(torch.tensor(token_ids), torch.arange(n), self.kv_cache, meta)
