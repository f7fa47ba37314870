"""Shape buckets: every jitted step sees one of a few shapes, so compilations stay bounded."""

from __future__ import annotations


def pow2_bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= n, at least `minimum`, capped at `maximum`."""
    b = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return b if maximum is None else min(b, maximum)
