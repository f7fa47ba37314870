"""Block allocator with reference counts and a prefix cache (host-side bookkeeping only).

Pages ("blocks") hold `block_size` tokens of every layer's K and V. A full block's contents are
named by a chained hash (the hash of its parent block plus its tokens), as in vLLM, so a
conversation's later turn or a shared system prompt finds its blocks again. A freed block whose
contents are cached stays findable until it is reused: free blocks form one LRU queue, and
allocation takes the least recently freed, dropping its cache entry.

Block 0 is the null block: never handed out, so padding writes have somewhere harmless to go.
`allocate` returns None when blocks do not fit; misuse (double free, writing a shared block)
raises.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from typing import Sequence

import numpy as np

NULL_BLOCK = 0


class AllocatorError(RuntimeError):
    """The allocator was misused (a bug in the caller, not a capacity problem)."""


def block_hashes(token_ids: Sequence[int], block_size: int, *, salt: bytes = b"") -> list[bytes]:
    """Chained content hashes of each *full* block of `token_ids`.

    `salt` separates caches that must never mix (another model, another adapter).
    """
    hashes, parent = [], hashlib.blake2b(salt, digest_size=16).digest()
    tokens = np.asarray(token_ids, dtype=np.int64)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(tokens[start:start + block_size].tobytes())
        parent = h.digest()
        hashes.append(parent)
    return hashes


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"{num_blocks=} must be >= 2 (block 0 is reserved)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        # Free blocks, least recently freed first; never-used blocks come before cached ones.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))

    # -- capacity -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free, including cached-but-unreferenced ones)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def is_cached(self, block: int) -> bool:
        return self._hash_of[block] is not None

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh, writable blocks (ref count 1), or None if fewer than `n` are free."""
        if n < 0:
            raise AllocatorError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become reusable.

        Blocks are queued in reverse, so a sequence's tail (least likely shared) is evicted first.
        """
        for block, count in Counter(blocks).items():
            self._check(block)
            if self._refs[block] < count:
                raise AllocatorError(f"block {block} freed more times than it was referenced")
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash_of[block] is None:
                    self._free[block] = None
                    self._free.move_to_end(block, last=False)  # uncached: reuse these first
                else:
                    self._free[block] = None

    def share(self, block: int) -> None:
        """Add a reference to a block that is in use (e.g. a forked sequence)."""
        self._check(block)
        if self._refs[block] == 0:
            raise AllocatorError(f"block {block} is free; allocate or look it up instead")
        self._refs[block] += 1

    # -- prefix cache ----------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Take a reference to the cached blocks of the longest cached prefix of `hashes`."""
        if not self.prefix_caching:
            return []
        found = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        for block in found:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        return found

    def commit(self, block: int, block_hash: bytes) -> None:
        """Record that `block` is full and holds the tokens named by `block_hash` (now read-only).

        If another block already holds the same contents, that one stays the cached copy.
        """
        self._check(block)
        if self._refs[block] == 0:
            raise AllocatorError(f"block {block} is free; only blocks in use can be committed")
        if not self.prefix_caching or self._hash_of[block] is not None:
            return
        if block_hash not in self._cached:
            self._cached[block_hash] = block
            self._hash_of[block] = block_hash

    def check_writable(self, block: int) -> None:
        """Raise unless `block` may be written: owned by exactly one sequence and not cached."""
        self._check(block)
        if self._refs[block] != 1 or self._hash_of[block] is not None:
            raise AllocatorError(
                f"block {block} is shared or cached (refs={self._refs[block]}, "
                f"cached={self._hash_of[block] is not None}) and must not be written")

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after new weights are loaded)."""
        for block, h in enumerate(self._hash_of):
            if h is not None:
                self._hash_of[block] = None
        self._cached.clear()

    # -- internals -------------------------------------------------------------------------
    def _evict(self, block: int) -> None:
        h = self._hash_of[block]
        if h is not None:
            del self._cached[h]
            self._hash_of[block] = None

    def _check(self, block: int) -> None:
        if not 0 < block < self.num_blocks:
            raise AllocatorError(f"block {block} is not a valid block id (1..{self.num_blocks - 1})")
