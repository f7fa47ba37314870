"""Block allocator: property tests that no block leaks, is freed twice, or is shared while written."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxpd.kv.allocator import NULL_BLOCK, AllocatorError, BlockAllocator, block_hashes

BLOCK = 4


def test_block_hashes_are_chained():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BLOCK)
    b = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BLOCK)
    c = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], BLOCK)
    assert len(a) == 2 and a == b  # the partial third block has no hash
    assert c[1] != b[1]  # same tokens in block 2, different parent
    assert block_hashes([1, 2, 3, 4], BLOCK, salt=b"other-model") != b[:1]


def test_allocate_returns_none_when_full_and_never_hands_out_the_null_block():
    alloc = BlockAllocator(5, BLOCK)
    blocks = alloc.allocate(4)
    assert sorted(blocks) == [1, 2, 3, 4] and NULL_BLOCK not in blocks
    assert alloc.allocate(1) is None
    alloc.free(blocks)
    assert alloc.num_free == 4


def test_misuse_raises():
    alloc = BlockAllocator(4, BLOCK)
    [b] = alloc.allocate(1)
    alloc.free([b])
    with pytest.raises(AllocatorError, match="freed more times"):
        alloc.free([b])
    [b] = alloc.allocate(1)
    with pytest.raises(AllocatorError, match="freed more times"):
        alloc.free([b, b])
    with pytest.raises(AllocatorError, match="not a valid block id"):
        alloc.free([0])


def test_prefix_cache_hit_after_free_and_lru_eviction():
    alloc = BlockAllocator(4, BLOCK)  # 3 usable blocks
    hashes = block_hashes(list(range(8)), BLOCK)
    first = alloc.allocate(2)
    for block, h in zip(first, hashes):
        alloc.commit(block, h)
    alloc.free(first)
    assert alloc.lookup(hashes) == first  # still cached after free
    alloc.free(first)
    # Two allocations take the never-cached block first, then the least recently freed cached
    # block (the sequence's tail, freed first in reverse order).
    taken = alloc.allocate(2)
    assert first[0] not in taken
    assert alloc.lookup(hashes) == [first[0]]
    with pytest.raises(AllocatorError, match="must not be written"):
        alloc.check_writable(first[0])


class AllocatorMachine(RuleBasedStateMachine):
    """Sequences grow, share cached prefixes, and finish, in any order."""

    def __init__(self):
        super().__init__()
        self.alloc = BlockAllocator(12, BLOCK)
        self.seqs: dict[int, tuple[list[int], list[int]]] = {}  # id -> (tokens, blocks)
        self.next_id = 0

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=20))
    def start(self, tokens):
        hashes = block_hashes(tokens[:-1], BLOCK)  # the last token is always recomputed
        cached = self.alloc.lookup(hashes)
        needed = -(-len(tokens) // BLOCK) - len(cached)
        fresh = self.alloc.allocate(needed)
        if fresh is None:
            self.alloc.free(cached)
            return
        for block in fresh:
            self.alloc.check_writable(block)  # nobody else can see a block being written
        blocks = cached + fresh
        for block, h in zip(blocks, block_hashes(tokens, BLOCK)):
            self.alloc.commit(block, h)
        self.seqs[self.next_id] = (tokens, blocks)
        self.next_id += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def finish(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        _, blocks = self.seqs.pop(sid)
        self.alloc.free(blocks)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def double_free_is_refused(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        _, blocks = self.seqs.pop(sid)
        self.alloc.free(blocks)
        extra = [b for b in blocks if self.alloc.ref_count(b) == 0]
        if extra:  # a block nobody references any more cannot be freed again
            with pytest.raises(AllocatorError):
                self.alloc.free(extra[:1])
        else:  # every block is still shared with a live sequence: its count says so
            live = {b for _, bs in self.seqs.values() for b in bs}
            assert blocks and all(b in live and self.alloc.ref_count(b) > 0 for b in blocks)

    @invariant()
    def refcounts_match_live_sequences(self):
        expected = [0] * self.alloc.num_blocks
        for _, blocks in self.seqs.values():
            for b in blocks:
                expected[b] += 1
        assert [self.alloc.ref_count(b) for b in range(self.alloc.num_blocks)] == expected
        assert self.alloc.num_free == sum(1 for r in expected[1:] if r == 0)  # nothing leaks

    @invariant()
    def cached_blocks_hold_what_their_hash_says(self):
        for tokens, blocks in self.seqs.values():
            for block, h in zip(blocks, block_hashes(tokens, BLOCK)):
                if self.alloc.is_cached(block):
                    assert self.alloc._hash_of[block] == h

    def teardown(self):
        for _, blocks in self.seqs.values():
            self.alloc.free(blocks)
        assert self.alloc.num_free == self.alloc.num_blocks - 1  # every page free again


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=150, stateful_step_count=30, deadline=None,
                                  derandomize=True)
