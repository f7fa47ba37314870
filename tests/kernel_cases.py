"""Paged-attention test batches shared by the TPU and GPU kernel tests."""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp

PAGE = 16


def paged_batch(rng, *, kv_heads, group, dim, dtype, rows, pages_per_seq=6, shared=False):
    """A mixed batch. `rows` lists (kv_len, new tokens): new == 1 is a decode token, new > 1 a
    prefill chunk after a cached prefix (kv_len - new tokens), new == 0 a padding row. Pages
    come from a random permutation of the pool (page 0, the null page, never used); with
    `shared`, rows 0 and 1 share their first page (a prefix-cache hit)."""
    num_pages = len(rows) * pages_per_seq + 2
    heads = kv_heads * group
    q_len = max(max(new for _, new in rows), 1)
    pool = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((len(rows), pages_per_seq), np.int32)
    positions = np.full((len(rows), q_len), -1, np.int32)
    lens = np.zeros(len(rows), np.int32)
    for i, (kv_len, new) in enumerate(rows):
        used = -(-kv_len // PAGE)
        table[i, :used] = pool[i * pages_per_seq:i * pages_per_seq + used]
        if new:
            positions[i, :new] = np.arange(kv_len - new, kv_len)
            lens[i] = kv_len
    if shared:
        table[1, 0] = table[0, 0]
    k = rng.standard_normal((kv_heads, num_pages, PAGE, dim)).astype(np.float32)
    v = rng.standard_normal((kv_heads, num_pages, PAGE, dim)).astype(np.float32)
    q = rng.standard_normal((len(rows), q_len, heads, dim)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jnp.asarray(table), jnp.asarray(positions), jnp.asarray(lens)
