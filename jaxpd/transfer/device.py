"""In-process KV hand-off with `jax.device_put`: prefill mesh -> decode mesh, same host.

Pages are gathered on the source mesh (one gather over every layer, into a contiguous buffer:
one big copy instead of many small ones), stripped of TP head replication, moved with
`device_put` into the destination's head sharding, re-replicated for the destination TP, and scattered into the
destination pool in place (donated). Page counts are bucketed, padding with the null page.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpd.engine.buckets import pow2_bucket
from jaxpd.errors import ConfigError
from jaxpd.kv.allocator import NULL_BLOCK
from jaxpd.kv.dtypes import convert_rows
from jaxpd.kv.layout import KVLayout, canonical_heads, replicate_heads
from jaxpd.kv.manager import KVCacheManager
from jaxpd.kv.pool import KVPages


@functools.partial(jax.jit, static_argnames=("layout",))
def gather_canonical(kv: KVPages, pages: jax.Array, *, layout: KVLayout) -> KVPages:
    """Every layer's K/V for `pages`: [layers, model_kv_heads, n, page_size, head_dim]."""
    return KVPages(*(canonical_heads(x[:, :, pages], layout, 1) for x in kv))


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("kv",))
def scatter_pages(kv: KVPages, moved: KVPages, pages: jax.Array, *, layout: KVLayout) -> KVPages:
    """Write canonical-head `moved` pages into `kv` at `pages`, replicating heads for `layout`."""
    return KVPages(*(x.at[:, :, pages].set(convert_rows(replicate_heads(m, layout, 1), m.dtype,
                                                        x.dtype, layout.head_dim))
                     for x, m in zip(kv, moved)))


def _wire_sharding(layout: KVLayout, mesh: Mesh | None):
    """How canonical pages land on the destination: split by head where the heads divide."""
    if mesh is None:
        return jax.devices()[0]
    spec = P(None, "tp") if layout.model_kv_heads % layout.tp == 0 else P()
    return NamedSharding(mesh, spec)


class DeviceTransport:
    """KVTransport for two meshes in one process."""

    def transfer(self, src: KVCacheManager, src_pages: list[int],
                 dst: KVCacheManager, dst_pages: list[int]) -> None:
        if not dst.layout.compatible(src.layout):
            raise ConfigError(f"KV layouts differ beyond TP: {src.layout} -> {dst.layout}")
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)=} != {len(dst_pages)=}")
        n = pow2_bucket(len(src_pages))
        src_idx = np.full(n, NULL_BLOCK, np.int32)
        dst_idx = np.full(n, NULL_BLOCK, np.int32)
        src_idx[:len(src_pages)] = src_pages
        dst_idx[:len(dst_pages)] = dst_pages
        canon = gather_canonical(src.kv, jnp.asarray(src_idx), layout=src.layout)
        moved = jax.device_put(canon, _wire_sharding(dst.layout, dst.mesh))
        dst.kv = scatter_pages(dst.kv, moved, jnp.asarray(dst_idx), layout=dst.layout)
