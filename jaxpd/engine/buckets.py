"""Shape buckets: every step program sees one of a few shapes, so compilations stay bounded.

A bucket list is the sizes that get a compiled program (`scheduler.prefill_batch_sizes`,
`prefill_chunk_sizes`, `decode_batch_sizes`); work is padded up to the smallest size that holds
it. More sizes mean less padding and more compilations (docs/benchmarks.md measures the
trade).
"""

from __future__ import annotations

from typing import Sequence

# The default buckets when a scheduler config names none (the placer's simulator pads as these)
DEFAULT_PREFILL_BATCH = 16  # prefill_batch_sizes: powers of two up to this many sequences
MIN_CHUNK = 16  # prefill_chunk_sizes: powers of two from this up to chunk_size


def pow2_bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= n, at least `minimum`, capped at `maximum`."""
    b = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return b if maximum is None else min(b, maximum)


def pow2_sizes(largest: int, smallest: int = 1) -> list[int]:
    """`smallest`, twice that, ... up to the first size >= `largest` (the default buckets)."""
    sizes = [smallest]
    while sizes[-1] < largest:
        sizes.append(sizes[-1] * 2)
    return sizes


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest of `sizes` (ascending) that holds `n`."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
