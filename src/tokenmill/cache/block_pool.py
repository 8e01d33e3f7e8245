"""Fixed-size KV blocks: reference counts, a free queue in LRU order, and the hash -> block map of cached blocks.

A freed block keeps its contents and its hash, so a later request with the same prefix can take it
back; it is only forgotten when the free queue hands it out again (least recently freed first).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tokenmill.cache.kv_events import BlockRemoved, BlockStored, external_hash
from tokenmill.cache.prefix_cache import PLAIN_HASH_BYTES


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and computed


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id, for full blocks (in use or free)
        # KV events (cache/kv_events.py), when they are published: what entered and left `cached` since taken
        self.events: list[BlockStored | BlockRemoved] | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks from the head of the free queue, evicting their cached hashes."""
        if count > len(self.free_queue):
            raise MemoryError(f"asked for {count} KV blocks, {len(self.free_queue)} free")
        ids = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                if self.events is not None and len(block.block_hash) == PLAIN_HASH_BYTES:  # not a group's copy
                    self.events.append(BlockRemoved([external_hash(block.block_hash)]))
                block.block_hash = None
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def share(self, block_id: int) -> None:
        """Take another reference to a cached block (revive it if it sat in the free queue)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference each; blocks reaching zero join the free queue's tail, in the order given."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def mark_cached(self, block_id: int, block_hash: bytes) -> bool:
        """Publish a full, computed block under its hash (first writer wins; duplicates stay private); True when
        it was published."""
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block_id
            return True
        return False

