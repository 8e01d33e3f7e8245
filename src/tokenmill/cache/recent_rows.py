"""Which blocks have a float16 twin of their rows (CacheConfig.kv_cache_recent_blocks, cache/kv_cache.py).

A query at position p reads the blocks of its aligned group of recent_blocks blocks up to its own from their twins
(csrc/paged_attention.h KVCacheRef), so a sequence needs twins for the blocks of its next step's positions and the
earlier blocks of the group its next position falls in: the KV manager keeps them (`keep`) when it allocates a
step, and gives back the ones no later query of the sequence reads when it commits one. Twins are assigned before
a block's rows are written, so a twin always holds every row its block holds. A block's twin belongs to the
request that asked for it; prefix hits end on a group's boundary, so a block shared through the prefix cache is
never in its sharers' windows (with windows that reach back a fixed number of blocks, the first row after a hit
would read a shared block whose twin is long gone). Only full-attention groups keep twins.
A twin is paid for in the cache's own currency: it holds `cost` blocks of the pool (its bytes over a block's,
rounded up) while it lives, so the byte budget, the usage metric and preemption all count it; the twins' own
memory is mapped lazily, like the blocks'.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.cache.block_pool import BlockPool


@dataclass(frozen=True)
class RecentRows:
    """A KV cache's twins, as the manager is told of them."""

    twin_of: torch.Tensor  # int32 [blocks], -1 for none, shared with the KV cache the kernels read
    num_twins: int  # as many as the pool's blocks can pay for
    recent_blocks: int
    cost: int  # pool blocks a twin holds


class RecentTwins:
    def __init__(self, pool: BlockPool, rows: RecentRows) -> None:
        self.pool = pool
        self.twin_of = rows.twin_of.numpy()  # the same memory: numpy's item access is ~10x torch's
        self.recent_blocks = rows.recent_blocks
        self.cost = rows.cost
        self.free = list(range(rows.num_twins - 1, -1, -1))
        self.owned: dict[str, dict[int, tuple[int, list[int]]]] = {}  # request -> block -> (index, blocks paid)

    def window(self, num_computed_tokens: int, block_size: int) -> int:
        """The first block index the next query of a sequence with this many computed tokens reads as twins."""
        return num_computed_tokens // block_size // self.recent_blocks * self.recent_blocks

    def missing(self, tables: list[list[int]], first: int, last: int) -> int:
        """Twins `keep` would add for entries first..last (entries past a table's end: blocks still to come)."""
        return sum(i >= len(table) or self._lacks(table[i])
                   for table in tables for i in range(max(0, first), last + 1))

    def _lacks(self, block: int) -> bool:
        """A held block without a twin (one that has one, its owner's or a sharer's, holds the same rows)."""
        return block >= 0 and self.twin_of[block] < 0

    def keep(self, request_id: str, tables: list[list[int]], first: int, last: int) -> None:
        """Twins for table entries first..last of each of the request's tables; the caller checked that the pool
        can pay for them (`missing`)."""
        owned = self.owned.setdefault(request_id, {})
        for table in tables:
            for i in range(max(0, first), min(last + 1, len(table))):
                block = table[i]
                if self._lacks(block):
                    self.twin_of[block] = self.free.pop()
                    owned[block] = (i, self.pool.allocate(self.cost))

    def release_before(self, request_id: str, first: int) -> None:
        """Give back the request's twins of blocks before index `first`."""
        self._release(request_id, lambda block, i: i < first)

    def release_from(self, request_id: str, first: int) -> None:
        """Give back the request's twins of blocks at index `first` and after (blocks trimmed off its tables)."""
        self._release(request_id, lambda block, i: i >= first)

    def release_all(self, request_id: str) -> None:
        self._release(request_id, lambda block, i: True)
        self.owned.pop(request_id, None)

    def _release(self, request_id: str, which: Callable[[int, int], bool]) -> None:
        owned = self.owned.get(request_id, {})
        for block in [b for b, (i, _) in owned.items() if which(b, i)]:
            self.free.append(int(self.twin_of[block]))
            self.twin_of[block] = -1
            self.pool.free(owned.pop(block)[1])
