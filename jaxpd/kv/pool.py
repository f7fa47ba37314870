"""A page pool on one mesh: every layer's K and V pages, sharded over KV heads on `tp`."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpd.kv.layout import KVLayout


class LayerPages(NamedTuple):
    k: jax.Array  # [kv_heads, num_pages, page_size, head_dim]
    v: jax.Array  # [kv_heads, num_pages, page_size, head_dim]


KVPages = tuple[LayerPages, ...]

PAGE_SPEC = P("tp", None, None, None)


def page_sharding(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, PAGE_SPEC)


def create_pages(layout: KVLayout, num_pages: int, mesh: Mesh | None) -> KVPages:
    """Zeroed pages for every layer, created directly in their sharded layout."""
    shape = (layout.kv_heads, num_pages, layout.page_size, layout.head_dim)
    sharding = page_sharding(mesh)

    @functools.partial(jax.jit, out_shardings=sharding)
    def zeros():
        return jnp.zeros(shape, layout.jnp_dtype)

    return tuple(LayerPages(zeros(), zeros()) for _ in range(layout.num_layers))
