"""Automatic prefix caching: a full block is named by a hash chained over every token before it.

hash(block i) = H(hash(block i-1), token ids of block i, extra keys), so two requests share block i
only if they agree on all tokens up to its end (and on extra keys such as a LoRA or image id).
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = b"tokenmill-prefix-v1"
PLAIN_HASH_BYTES = 16  # a block's own hash; KV groups other than the first cache copies under longer keys


def hash_block(parent: bytes, token_ids: Sequence[int], extra_keys: bytes = b"") -> bytes:
    h = hashlib.blake2b(parent, digest_size=PLAIN_HASH_BYTES)
    h.update(array("q", token_ids).tobytes())
    h.update(extra_keys)
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                        extra_keys: bytes = b"") -> None:
    """Append the hashes of full blocks of `token_ids` not yet in `hashes` (in place, incremental)."""
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else ROOT_HASH
        hashes.append(hash_block(parent, token_ids[start:start + block_size], extra_keys))
