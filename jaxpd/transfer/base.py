"""The one interface every KV transport implements, so the scheduler never cares how KV moves."""

from __future__ import annotations

from typing import Protocol

from jaxpd.kv.manager import KVCacheManager


class KVTransport(Protocol):
    def transfer(self, src: KVCacheManager, src_pages: list[int],
                 dst: KVCacheManager, dst_pages: list[int]) -> None:
        """Copy pages `src_pages` of `src`'s pool into pages `dst_pages` of `dst`'s pool.

        The two pools may live on different meshes with different TP degrees; KV heads are
        resharded (and TP head replication converted) on the way. Returns once the copy is
        enqueued on the destination; later reads of `dst.kv` see it.
        """
        ...
