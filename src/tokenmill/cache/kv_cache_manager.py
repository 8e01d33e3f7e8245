"""Which KV blocks each request holds: allocation, prefix-cache hits, publishing full blocks, freeing.

The manager owns block tables; the scheduler asks it for room and never touches blocks itself.
A request holds one table per KV group (see kv_layout): `block_tables[request_id][group]`, entry i the block
of positions [i * block_size, (i + 1) * block_size). In a sliding-window group, blocks that fell out of the
window are given back after each step (and before each allocation) and their entries become NULL_BLOCK, so
such a group holds at most about (window + chunk) / block_size blocks per request during a step, and about
window / block_size between steps, however long the sequence grows.

Prefix caching with several groups: each group publishes its own copy of a full block (under the chain
hash salted with the group index), and a prefix hit needs every group to still have every block of the
prefix. A sliding group's out-of-window blocks are freed but stay cached (in LRU order) until the pool
reuses them, so hits work while they survive; once one is evicted, later requests hit only the prefix before
it. (vLLM's sliding-window manager needs just the window's blocks before the hit point; a possible refinement.)

With recent rows (cache/recent_rows.py) the manager also keeps each request's float16 twins, in full-attention
groups: for the blocks of the positions it allocates and the earlier blocks of their aligned groups, given back
once no later query reads them; prefix hits end on a group's boundary, so no window holds a shared block.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenmill.cache.block_pool import BlockPool
from tokenmill.cache.kv_events import BlockStored, external_hash
from tokenmill.cache.prefix_cache import extend_block_hashes
from tokenmill.cache.recent_rows import RecentRows, RecentTwins

NULL_BLOCK = -1  # a table entry whose block left the sliding window and was freed


class CachedSequence(Protocol):
    """What the manager reads of a sequence (the engine's Request, a draft model's sequence); it never writes
    more than its prefix-cache hash chain."""

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_hashes: list[bytes]

    @property
    def num_tokens(self) -> int: ...


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 windows: Sequence[int | None] = (None,), recent: RecentRows | None = None) -> None:
        """`windows`: one entry per KV group, its sliding window (None: full attention); `recent`: the cache's
        twins of recent rows (None: it keeps none)."""
        self.pool = BlockPool(num_blocks)
        self.recent = RecentTwins(self.pool, recent) if recent else None
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = tuple(windows)
        self.block_tables: dict[str, list[list[int]]] = {}  # request -> one table per group
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of each table already published
        self.prefix_stats = PrefixCacheStats()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    def max_request_tokens(self, max_chunk: int, limit: int) -> int:
        """The longest sequence (up to `limit`) whose blocks fit in the whole pool at its peak, computing up to
        `max_chunk` tokens per step: a full group holds every block, a sliding one the window plus the chunk."""
        twin_blocks = 0 if self.recent is None else (  # the twins of its window and of a chunk's blocks
            (self.recent.recent_blocks + max_chunk // self.block_size + 2) * self.recent.cost
            * self.windows.count(None))

        def peak(num_tokens: int) -> int:
            full = self.blocks_needed(num_tokens)
            return twin_blocks + sum(full if w is None else min(full, (max_chunk + w - 3) // self.block_size + 2)
                                     for w in self.windows)

        low, high = 0, limit
        while low < high:  # peak grows with the length: bisect for the last length that fits
            mid = (low + high + 1) // 2
            low, high = (mid, high) if peak(mid) <= self.pool.num_blocks else (low, mid - 1)
        return low

    def lookup_prefix(self, request: CachedSequence) -> int:
        """Claim cached blocks matching the request's leading full blocks; returns tokens covered.

        At least the last token is always left to compute, since its logits are needed.
        """
        self.block_tables.setdefault(request.request_id, [[] for _ in self.windows])
        if not self.enable_prefix_caching:
            return 0
        extend_block_hashes(request.block_hashes, request.token_ids, self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[list[int]] = []
        for block_hash in request.block_hashes[:max_blocks]:
            ids = [self.pool.lookup(_group_key(g, block_hash)) for g in range(len(self.windows))]
            if None in ids:
                break
            hits.append(ids)
        if self.recent is not None:  # the first query's window must be blocks this request writes (and twins)
            del hits[len(hits) // self.recent.recent_blocks * self.recent.recent_blocks:]
        for ids in hits:
            for block_id in ids:
                self.pool.share(block_id)
        self.block_tables[request.request_id] = [[ids[g] for ids in hits] for g in range(len(self.windows))]
        self.num_cached_blocks[request.request_id] = len(hits)
        return len(hits) * self.block_size

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_stats.queries += num_tokens
        self.prefix_stats.hits += num_hit_tokens

    def allocate(self, request: CachedSequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more computed tokens; False (no new blocks) if blocks run out.

        Sliding groups first give back the blocks no query of the request can see any more (after a prefix
        hit, those are the hit's early blocks).
        """
        tables = self.block_tables.setdefault(request.request_id, [[] for _ in self.windows])
        self._free_out_of_window(request)
        total = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        needed = [max(0, total - len(table)) for table in tables]
        twins = 0
        if self.recent is not None:
            first = self.recent.window(request.num_computed_tokens, self.block_size)
            full = [table for table, window in zip(tables, self.windows) if window is None]
            twins = self.recent.missing(full, first, total - 1) * self.recent.cost
        if sum(needed) + twins > self.pool.num_free:
            return False
        for table, count in zip(tables, needed):
            if count:
                table.extend(self.pool.allocate(count))
        if twins:
            self.recent.keep(request.request_id, full, first, total - 1)
        return True

    def _free_out_of_window(self, request: CachedSequence) -> None:
        """In sliding groups, give back the blocks before the window of the next query (at position
        num_computed_tokens, seeing keys from num_computed_tokens - window + 1 on)."""
        for table, window in zip(self.block_tables[request.request_id], self.windows):
            if window is None:
                continue
            first_needed = max(0, request.num_computed_tokens - window + 1) // self.block_size
            freed = []
            for i in range(min(first_needed, len(table)) - 1, -1, -1):  # freed entries form a prefix
                if table[i] == NULL_BLOCK:
                    break
                freed.append(table[i])
                table[i] = NULL_BLOCK
            self.pool.free(freed)

    def commit(self, request: CachedSequence) -> None:
        """After a step: publish the request's blocks that are now full and computed, so later requests can
        share them, then give back the sliding-window blocks it no longer needs (published ones stay cached)."""
        if self.enable_prefix_caching:
            self._publish(request)
        if self.recent is not None:
            self.recent.release_before(request.request_id,
                                       self.recent.window(request.num_computed_tokens, self.block_size))
        self._free_out_of_window(request)

    def _publish(self, request: CachedSequence) -> None:
        tables = self.block_tables[request.request_id]
        full = request.num_computed_tokens // self.block_size
        done = self.num_cached_blocks.get(request.request_id, 0)
        if full <= done:
            return
        extend_block_hashes(request.block_hashes, request.token_ids[: full * self.block_size], self.block_size)
        for g, table in enumerate(tables):
            for i in range(done, full):
                published = self.pool.mark_cached(table[i], _group_key(g, request.block_hashes[i]))
                if published and g == 0 and self.pool.events is not None:
                    parent = external_hash(request.block_hashes[i - 1]) if i else None
                    tokens = list(request.token_ids[i * self.block_size:(i + 1) * self.block_size])
                    self.pool.events.append(BlockStored([external_hash(request.block_hashes[i])], parent, tokens,
                                                        self.block_size))
        self.num_cached_blocks[request.request_id] = full

    def trim(self, request: CachedSequence) -> None:
        """Give back the blocks past the request's computed tokens (the KV of rejected speculated tokens).
        They were never published: only blocks of computed, final tokens are."""
        keep = self.blocks_needed(request.num_computed_tokens)
        if self.recent is not None:
            self.recent.release_from(request.request_id, keep)
        for table in self.block_tables.get(request.request_id, []):
            self.pool.free(list(reversed(table[keep:])))
            del table[keep:]

    def free(self, request: CachedSequence) -> None:
        """Release every block of the request; tail blocks first into the free queue, so they are evicted first."""
        tables = self.block_tables.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        if self.recent is not None:
            self.recent.release_all(request.request_id)
        for table in tables:
            self.pool.free([b for b in reversed(table) if b != NULL_BLOCK])

    def held_blocks(self, request_id: str) -> list[int]:
        """Blocks the request holds now, per group."""
        return [sum(b != NULL_BLOCK for b in table) for table in self.block_tables.get(request_id, [])]

    def utilization(self, requests: Sequence[CachedSequence]) -> float:
        """Tokens stored / slots in the blocks the requests hold, over all groups."""
        stored = slots = 0
        for request in requests:
            for table, held in zip(self.block_tables.get(request.request_id, []), self.held_blocks(request.request_id)):
                stored += request.num_computed_tokens - (len(table) - held) * self.block_size
                slots += held * self.block_size
        return stored / slots if slots else 0.0


def _group_key(group: int, block_hash: bytes) -> bytes:
    """Each group caches its own copy of a block; group 0 keeps the plain hash."""
    return block_hash if group == 0 else block_hash + group.to_bytes(2, "little")
