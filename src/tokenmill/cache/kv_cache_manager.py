"""Which KV blocks each request holds: allocation, prefix-cache hits, publishing full blocks, freeing.

The manager owns block tables; the scheduler asks it for room and never touches blocks itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.cache.block_pool import BlockPool
from tokenmill.cache.prefix_cache import extend_block_hashes
from tokenmill.engine.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of each table already published
        self.prefix_stats = PrefixCacheStats()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    def lookup_prefix(self, request: Request) -> int:
        """Claim cached blocks matching the request's leading full blocks; returns tokens covered.

        At least the last token is always left to compute, since its logits are needed.
        """
        self.block_tables.setdefault(request.request_id, [])
        if not self.enable_prefix_caching:
            return 0
        extend_block_hashes(request.block_hashes, request.token_ids, self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        for block_id in hits:
            self.pool.share(block_id)
        self.block_tables[request.request_id] = hits
        self.num_cached_blocks[request.request_id] = len(hits)
        return len(hits) * self.block_size

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_stats.queries += num_tokens
        self.prefix_stats.hits += num_hit_tokens

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more computed tokens; False (nothing changed) if blocks run out."""
        table = self.block_tables.setdefault(request.request_id, [])
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(table)
        if needed > self.pool.num_free:
            return False
        if needed > 0:
            table.extend(self.pool.allocate(needed))
        return True

    def commit(self, request: Request) -> None:
        """Publish the request's blocks that are now full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables[request.request_id]
        full = request.num_computed_tokens // self.block_size
        done = self.num_cached_blocks.get(request.request_id, 0)
        if full <= done:
            return
        extend_block_hashes(request.block_hashes, request.token_ids[: full * self.block_size], self.block_size)
        for i in range(done, full):
            self.pool.mark_cached(table[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = full

    def free(self, request: Request) -> None:
        """Release every block of the request; tail blocks first into the free queue, so they are evicted first."""
        table = self.block_tables.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free(list(reversed(table)))
