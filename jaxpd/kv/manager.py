"""Per-mesh KV cache manager: the page pool, its allocator, and per-sequence page lists.

Engines ask it for a sequence's pages (reusing prefix-cached blocks), for one more page as a
sequence grows, and to release a sequence. It hides allocator internals from the schedulers.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jax.sharding import Mesh

from jaxpd.kv.allocator import NULL_BLOCK, BlockAllocator, block_hashes
from jaxpd.kv.layout import KVLayout
from jaxpd.kv.pool import KVPages, create_pages


@dataclasses.dataclass
class SeqPages:
    """A sequence's pages on one mesh and how many of its tokens they hold."""

    pages: list[int]
    num_cached: int = 0  # prompt tokens found in the prefix cache (not recomputed)
    num_committed_blocks: int = 0  # full blocks already entered into the prefix cache
    num_dropped: int = 0  # leading pages given back because they left the sliding window


class KVCacheManager:
    def __init__(self, layout: KVLayout, num_pages: int, mesh: Mesh | None, *,
                 prefix_caching: bool = True, cache_salt: bytes = b""):
        self.layout, self.mesh = layout, mesh
        self.allocator = BlockAllocator(num_pages, layout.page_size, prefix_caching=prefix_caching)
        self.kv: KVPages = create_pages(layout, num_pages, mesh)
        self.salt = cache_salt
        self.prefix_hits_tokens = 0  # prompt tokens served from the prefix cache, cumulative

    @property
    def page_size(self) -> int:
        return self.layout.page_size

    def allocate_prompt(self, prompt: Sequence[int], *, keep_free: int = 0) -> SeqPages | None:
        """Pages for a prompt, cached blocks first; None if it won't fit while leaving
        `keep_free` pages for sequences already running.

        At least the last prompt token is always recomputed: its logits give the first token.
        """
        return self._allocate_after_cached(prompt[:-1], len(prompt), keep_free)

    def allocate_received(self, prompt: Sequence[int]) -> SeqPages | None:
        """Pages for a prompt whose KV another worker computes, and its first token: cached
        blocks first (all of the prompt may be cached, since the sender computes the first
        token), so only the rest has to be sent. None if it won't fit."""
        return self._allocate_after_cached(prompt, len(prompt) + 1, 0)

    def _allocate_after_cached(self, lookup: Sequence[int], num_tokens: int,
                               keep_free: int) -> SeqPages | None:
        hashes = block_hashes(lookup, self.page_size, salt=self.salt)
        cached = self.allocator.lookup(hashes)
        need = self.layout.pages_for(num_tokens) - len(cached)
        if self.allocator.num_free - max(need, 0) < keep_free:
            self.allocator.free(cached)
            return None
        fresh = self.allocator.allocate(max(need, 0))
        if fresh is None:
            self.allocator.free(cached)
            return None
        num_cached = len(cached) * self.page_size
        self.prefix_hits_tokens += num_cached
        return SeqPages(cached + fresh, num_cached, len(cached))

    def allocate(self, num_tokens: int) -> SeqPages | None:
        """Fresh pages for `num_tokens` (no prefix-cache lookup); None if they don't fit."""
        pages = self.allocator.allocate(self.layout.pages_for(num_tokens))
        return None if pages is None else SeqPages(pages)

    def ensure_capacity(self, seq: SeqPages, num_tokens: int) -> bool:
        """Grow `seq` to hold `num_tokens`; False (nothing changed) if pages ran out."""
        need = self.layout.pages_for(num_tokens) - len(seq.pages)
        if need <= 0:
            return True
        fresh = self.allocator.allocate(need)
        if fresh is None:
            return False
        seq.pages.extend(fresh)
        return True

    def commit_full_blocks(self, seq: SeqPages, tokens: Sequence[int], num_computed: int) -> None:
        """Enter the now-complete blocks of `tokens[:num_computed]` into the prefix cache."""
        full = num_computed // self.page_size
        if full <= seq.num_committed_blocks:
            return
        hashes = block_hashes(tokens[:full * self.page_size], self.page_size, salt=self.salt)
        for i in range(seq.num_committed_blocks, full):
            self.allocator.commit(seq.pages[i], hashes[i])
        seq.num_committed_blocks = full

    def drop_outside_window(self, seq: SeqPages, next_position: int, window: int) -> int:
        """Give back the leading pages no query at `next_position` or later can see (every key
        at or below `next_position - window`); their table entries become the null page, which
        attention masks by position anyway. Returns how many pages were freed."""
        first_visible = max(0, next_position - window + 1)
        keep_from = min(first_visible // self.page_size, len(seq.pages))
        if keep_from <= seq.num_dropped:
            return 0
        dropped = seq.pages[seq.num_dropped:keep_from]
        self.allocator.free(dropped)
        seq.pages[seq.num_dropped:keep_from] = [NULL_BLOCK] * len(dropped)
        seq.num_dropped = keep_from
        return len(dropped)

    def release(self, seq: SeqPages) -> None:
        self.allocator.free(seq.pages[seq.num_dropped:])
        seq.pages = []

    @property
    def all_free(self) -> bool:
        """True when no page is referenced (cached-but-free pages count as free)."""
        return self.allocator.num_used == 0
