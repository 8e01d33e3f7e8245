"""The GPU path's decode steps at fixed sizes, replayed as CUDA graphs: a decode step of a small model launches a
few hundred short kernels, whose launch costs would otherwise exceed the time the GPU spends streaming weights.

A step of n decode rows runs at the smallest captured size >= n (vLLM's capture sizes: 1, 2, 4, then multiples
of 8). Its inputs are copied into static buffers; rows past n are padding that attend to one key of a spare KV
block no request owns (cache/kv_cache.py `padding_block`) and write there, so the real rows' results are those of
the plain step. Block tables are kept at the width of the longest sequence the engine admits; a kernel reads a
row's table only up to its length, so stale entries past it are never read.

On CUDA each size is captured once (after an eager warm-up run that compiles its Triton kernels) and replayed;
elsewhere (Triton's interpreter, in tests) the same padded step runs eagerly, so the padding and buffers are
checked where graphs cannot be.
"""
from __future__ import annotations

import logging

import torch

from tokenmill.cache.kv_cache import KVCache
from tokenmill.model.batch import StepBatch
from tokenmill.model.layers.paged_attention import AttentionMetadata, RowTables
from tokenmill.model.llama import LlamaModel

logger = logging.getLogger("tokenmill.model")

CAPTURE_SIZES = (1, 2, 4, *range(8, 513, 8))


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device, max_rows: int,
                 max_blocks: int) -> None:
        """max_rows: the most decode rows of a step (max_num_seqs); max_blocks: the most blocks of one sequence."""
        if kv_cache.padding_block is None:
            raise ValueError("decode graphs need a KV cache with a padding block")
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.sizes = [s for s in CAPTURE_SIZES if s < max_rows] + [max_rows]
        self.max_blocks = max_blocks
        rows = self.sizes[-1]
        self.token_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.groups = [(torch.zeros(rows, max_blocks, dtype=torch.long, device=device),
                        torch.ones(rows, dtype=torch.long, device=device),
                        torch.zeros(rows, dtype=torch.long, device=device)) for _ in kv_cache.layout.windows]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if device.type == "cuda":
            self._capture()

    def fits(self, batch: StepBatch) -> bool:
        """A step of decode rows only (one token per sequence, each a logit row), within the captured sizes."""
        return (len(batch.chunks) == batch.num_tokens <= self.sizes[-1]
                and all(c.num_drafts == 0 and c.samples for c in batch.chunks))

    def run(self, batch: StepBatch, row_groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits [n, vocab] of a fitting step; row_groups: the runner's per-group tables, lens and slots."""
        n = batch.num_tokens
        size = next(s for s in self.sizes if s >= n)
        self._pad(n, size)
        self.token_ids[:n].copy_(torch.tensor(batch.token_ids))
        self.positions[:n].copy_(torch.tensor(batch.positions))
        for (tables, lens, slots), (t, ln, sl) in zip(self.groups, row_groups):
            tables[:n, :t.shape[1]].copy_(t)
            lens[:n].copy_(ln)
            slots[:n].copy_(sl)
        if size in self.graphs:
            graph, logits = self.graphs[size]
            graph.replay()
            return logits[:n]
        return self._forward(size)[:n]

    def _pad(self, first: int, size: int) -> None:
        """Rows first..size-1 as padding: one key of the padding block, written there."""
        block, bs = self.kv_cache.padding_block, self.kv_cache.block_size
        self.token_ids[first:size] = 0
        self.positions[first:size] = 0
        for tables, lens, slots in self.groups:
            tables[first:size, 0] = block
            lens[first:size] = 1
            slots[first:size] = block * bs

    def _forward(self, size: int) -> torch.Tensor:
        meta = [AttentionMetadata(slot_mapping=slots[:size], window=window,
                                  rows=RowTables(tables[:size], lens[:size]))
                for (tables, lens, slots), window in zip(self.groups, self.kv_cache.layout.windows)]
        return self.model(self.token_ids[:size], self.positions[:size], self.kv_cache, meta)

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in reversed(self.sizes):  # the largest first: smaller graphs reuse its pool's memory
                self._pad(0, size)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._forward(size)  # warm-up: compiles the Triton kernels this size launches
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size)
                self.graphs[size] = (graph, logits)
        logger.info("captured CUDA graphs of decode steps for %d sizes up to %d rows", len(self.sizes), self.sizes[-1])
