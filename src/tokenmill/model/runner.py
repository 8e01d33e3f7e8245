"""ModelRunner: turns a StepBatch into flat input tensors + attention metadata, runs the model.

It reads the batch's block tables but never changes them; the scheduler and the KV manager own those.
Token ids and positions are shared by all layers; attention metadata is built once per KV group (see
cache/kv_layout.py), since each group has its own block tables and window. A sliding-window group's tables
are cut to the blocks the chunk can see, so local layers gather and attend over the window only.
On the GPU path (model/placement.py) every step runs the model with per-row metadata, the fused step's model,
built on the CPU and copied to the GPU once per step.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.cache.kv_cache import KVCache
from tokenmill.model.batch import StepBatch
from tokenmill.model.decode_graphs import DecodeGraphs
from tokenmill.model.fused_decode import FusedDecoder
from tokenmill.model.layers.paged_attention import AttentionMetadata, PrefillSpan, RowTables
from tokenmill.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, gpu: torch.device | None = None,
                 decode_graphs: DecodeGraphs | None = None) -> None:
        """gpu: the GPU path's tensor device (a model placed by model/placement.py); None: the CPU path.
        decode_graphs: the GPU path's fixed-size decode steps (None: every step eager)."""
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.windows = kv_cache.layout.windows
        self.gpu = gpu
        self.fused = FusedDecoder.build(model, kv_cache) if gpu is None else None
        self.decode_graphs = decode_graphs

    def start(self) -> None:
        """Ready the runner in the process that will run the steps (the engine core calls it): nothing to do for one
        process; a tensor-parallel runner starts its workers (distributed/tensor_parallel.py)."""

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits of the batch's `logits_rows`, in order: [rows, vocab] (on the GPU path, on the GPU)."""
        if self.gpu is not None:
            return self._gpu_step(batch)
        if self.fused is not None and batch.num_tokens <= self.fused.max_rows:
            return self._fused_step(batch)
        masks: dict[int | None, torch.Tensor] = {}  # decode masks depend only on the window: shared by groups
        meta = [self._group_metadata(g, window, batch, masks) for g, window in enumerate(self.windows)]
        return self.model(torch.tensor(batch.token_ids), torch.tensor(batch.positions), self.kv_cache, meta,
                          torch.tensor(batch.logits_rows, dtype=torch.long))

    def _fused_step(self, batch: StepBatch) -> torch.Tensor:
        """A step through the native decoder stack: every token is one row that attends to its own prefix (the
        rows of a prefill or verify chunk see the rows before them, written first; they attend as one run, see
        kernels/csrc/paged_attention.cpp). Metadata is built from plain lists (no masks)."""
        x = self.model.embed(torch.tensor(batch.token_ids))
        self.fused.run(x, torch.tensor(batch.positions), self._row_groups(batch))
        rows = batch.logits_rows
        return self.model.logits(x if len(rows) == batch.num_tokens else x[rows])

    def _gpu_step(self, batch: StepBatch) -> torch.Tensor:
        """The model over per-row metadata, the fused step's: the GPU kernel attends each row to its own prefix."""
        dev, groups = self.gpu, self._row_groups(batch)
        if self.decode_graphs is not None and self.decode_graphs.fits(batch):
            return self.decode_graphs.run(batch, groups)
        meta = [AttentionMetadata(slot_mapping=slots.to(dev), window=window,
                                  rows=RowTables(tables.to(dev), lens.to(dev)))
                for (tables, lens, slots), window in zip(groups, self.windows)]
        rows = batch.logits_rows
        logits_rows = None if len(rows) == batch.num_tokens else torch.tensor(rows, dtype=torch.long).to(dev)
        return self.model(torch.tensor(batch.token_ids).to(dev), torch.tensor(batch.positions).to(dev),
                          self.kv_cache, meta, logits_rows)

    def _row_groups(self, batch: StepBatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per KV group: every row's block table (padded with block 0), its key count counted from its table's
        first block, and its cache slot."""
        bs = self.block_size
        groups = []
        for g, window in enumerate(self.windows):
            tables, lens, slots = [], [], []
            for chunk in batch.chunks:
                full = chunk.block_tables[g]
                first = self._first_visible_block(chunk.start, window)
                table = full[first:(chunk.end - 1) // bs + 1]
                for pos in range(chunk.start, chunk.end):
                    tables.append(table)
                    lens.append(pos + 1 - first * bs)
                    slots.append(full[pos // bs] * bs + pos % bs)
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]
            groups.append((torch.tensor(padded), torch.tensor(lens), torch.tensor(slots)))
        return groups

    def _first_visible_block(self, start: int, window: int | None) -> int:
        """The first block a chunk starting at position `start` can see (0 without a sliding window)."""
        return 0 if window is None else max(0, start - window + 1) // self.block_size

    def _group_metadata(self, group: int, window: int | None, batch: StepBatch, masks: dict) -> AttentionMetadata:
        bs = self.block_size
        meta = AttentionMetadata(slot_mapping=None, window=window)
        slots, decode_tables, decode_starts, decode_lens = [], [], [], []
        row = 0
        for chunk in batch.chunks:
            start, n, end = chunk.start, chunk.num_tokens, chunk.end
            first = self._first_visible_block(start, window)
            table = torch.tensor(chunk.block_tables[group][first:-(-end // bs)], dtype=torch.long)
            pos = torch.arange(start, end)
            slots.append(table[pos // bs - first] * bs + pos % bs)
            if chunk.is_decode:  # one decode query per token, each seeing its prefix
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
        return self.model(*self.uncached_inputs(token_ids))

    @torch.inference_mode()
    def embed(self, token_ids: Sequence[int], pooling: str) -> torch.Tensor:
        """The sequence's final hidden states (after the last norm), averaged over its tokens ("mean") or taken at
        its last ("last"), L2-normalized: llama.cpp's --embedding and vLLM's pooling runner, in one uncached pass."""
        hidden = self.model.norm(self.model.hidden_states(*self.uncached_inputs(token_ids))).float()
        return torch.nn.functional.normalize(hidden[-1] if pooling == "last" else hidden.mean(0), dim=-1)

    def uncached_inputs(self, token_ids: Sequence[int]) -> tuple:
        """The model's inputs for one whole sequence attending only to itself, writing no KV cache (`score`'s;
        outside inference mode, for training)."""
        return uncached_inputs(token_ids, self.kv_cache, self.gpu)


def uncached_inputs(token_ids: Sequence[int], kv_cache: KVCache, device: torch.device | None = None) -> tuple:
    """The model's inputs (ids, positions, cache, metadata) for one sequence attending only to itself: no slot of
    `kv_cache` is read or written."""
    n = len(token_ids)
    span = PrefillSpan(0, n, n, torch.empty(0, dtype=torch.long))
    meta = [AttentionMetadata(slot_mapping=None, prefills=[span], window=w) for w in kv_cache.layout.windows]
    return torch.tensor(token_ids, device=device), torch.arange(n, device=device), kv_cache, meta
