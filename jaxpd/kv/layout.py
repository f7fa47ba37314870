"""The KV layout: the one contract between a prefill mesh and a decode mesh.

A page pool holds K and V pages shaped `[num_layers, kv_heads, num_pages, page_size,
head_dim]`, sharded on the KV-head axis over `tp`. Heads right after layers because that is the
axis TP splits, so each rank's part of a layer is one contiguous slab, and a page of one head is
a contiguous `[page_size, head_dim]` tile, which is what paged-attention kernels load per step
(the layout of JAX's Pallas paged attention ops). Layers stacked in one array so a scanned layer
stack carries the pool as a loop buffer and writes a layer's new K/V in place at a traced layer
index; the step functions donate it.

`kv_heads` counts heads as stored: with fewer model KV heads than TP ranks, each head is
replicated so every rank holds the head its query heads read. Two meshes with different TP
degrees therefore differ in stored heads; `canonical_heads`/`replicate_heads` convert.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxpd.kv.dtypes import KV_DTYPES, row_width
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import kv_head_repeat
from jaxpd.model.sharding import check_tp


@dataclasses.dataclass(frozen=True)
class KVLayout:
    num_layers: int
    model_kv_heads: int  # the model's KV heads
    head_repeat: int  # copies of each KV head stored (> 1 when TP exceeds the KV heads)
    head_dim: int
    page_size: int
    dtype: str
    tp: int

    @classmethod
    def for_model(cls, config: ModelConfig, *, tp: int, page_size: int,
                  dtype: str | None = None) -> KVLayout:
        check_tp(config, tp)
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"{page_size=} must be a power of two")
        return cls(num_layers=config.num_layers, model_kv_heads=config.num_kv_heads,
                   head_repeat=kv_head_repeat(config, tp), head_dim=config.head_dim,
                   page_size=page_size, dtype=dtype or config.dtype, tp=tp)

    @property
    def kv_heads(self) -> int:
        """Heads as stored in the pool (model heads x replication)."""
        return self.model_kv_heads * self.head_repeat

    @property
    def jnp_dtype(self):
        return KV_DTYPES[self.dtype]

    @property
    def row_width(self) -> int:
        """Elements stored per token and head: head_dim, plus an int8 row's scale bytes."""
        return row_width(self.dtype, self.head_dim)

    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V, all stored heads."""
        item = np.dtype(self.jnp_dtype).itemsize
        return 2 * self.num_layers * self.kv_heads * self.page_size * self.row_width * item

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def compatible(self, other: KVLayout) -> bool:
        """Whether KV written under `other` can be read under `self` (after head conversion,
        and a cast when the two pools store different dtypes)."""
        return (self.num_layers, self.model_kv_heads, self.head_dim, self.page_size) == (
            other.num_layers, other.model_kv_heads, other.head_dim, other.page_size)


def canonical_heads(pages: jnp.ndarray, layout: KVLayout, axis: int) -> jnp.ndarray:
    """Drop TP replication: stored heads -> the model's KV heads, along `axis`."""
    if layout.head_repeat == 1:
        return pages
    index = [slice(None)] * pages.ndim
    index[axis] = slice(None, None, layout.head_repeat)
    return pages[tuple(index)]


def replicate_heads(pages: jnp.ndarray, layout: KVLayout, axis: int) -> jnp.ndarray:
    """The model's KV heads -> heads as `layout` stores them, along `axis`."""
    return pages if layout.head_repeat == 1 else jnp.repeat(pages, layout.head_repeat, axis=axis)
