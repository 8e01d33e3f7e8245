"""KV cache events in vLLM's shape (BlockStored, BlockRemoved, AllBlocksCleared), for routers that track which
prefixes each engine holds (llm-d's precise prefix-cache scorer, Dynamo's KV router).

A block is stored when it becomes a prefix-cache entry (full, computed, published under its hash) and removed
when its entry is evicted; only the first KV group's entries are reported (sliding-window models cache a copy per
group). The hash a router sees: the first 8 bytes, big-endian, of the block's own hash, which is BLAKE2b-128 over
the parent block's 16-byte hash (b"tokenmill-prefix-v1" for the first block) followed by the block's token ids as
little-endian int64 (cache/prefix_cache.py). A router that hashes tokens itself can compute the same values.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "cpu"


@dataclass
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = "cpu"


@dataclass
class AllBlocksCleared:
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


def external_hash(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:8], "big")


def wire_format(event: KVCacheEvent) -> list:
    """msgspec's array-like tagged layout, which vLLM's KVEventBatch decoder reads: [tag, field, ...]."""
    return [type(event).__name__, *vars(event).values()]
