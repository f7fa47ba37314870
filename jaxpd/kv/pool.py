"""A page pool on one mesh: every layer's K and V pages, stacked, sharded over KV heads on `tp`."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpd.kv.layout import KVLayout


class KVPages(NamedTuple):
    """The pool. Stacked over layers so a scanned layer stack carries it as one loop buffer and
    updates one layer in place with a dynamic index (a per-layer tuple cannot be indexed by a
    traced layer)."""

    k: jax.Array  # [num_layers, kv_heads, num_pages, page_size, head_dim]
    v: jax.Array  # [num_layers, kv_heads, num_pages, page_size, head_dim]


PAGE_SPEC = P(None, "tp", None, None, None)


def page_sharding(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, PAGE_SPEC)


def create_pages(layout: KVLayout, num_pages: int, mesh: Mesh | None) -> KVPages:
    """Zeroed pages for every layer, created directly in their sharded layout."""
    shape = (layout.num_layers, layout.kv_heads, num_pages, layout.page_size, layout.row_width)

    @functools.partial(jax.jit, out_shardings=page_sharding(mesh))
    def zeros():
        return jnp.zeros(shape, layout.jnp_dtype)

    return KVPages(zeros(), zeros())
