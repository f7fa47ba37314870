"""Attention entry points over paged KV, one per phase, with the backend chosen once.

`implementation`:
  reference  pure jnp: gather the sequence's pages, masked softmax in f32 (runs everywhere)
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")` on the gathered pages (GPU)
  pallas     our Pallas kernels (flash prefill, paged decode) - not available yet
  auto       cudnn on GPU when it fits, else reference
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp

from jaxpd.errors import ConfigError
from jaxpd.model.attention import causal_attention

Implementation = Literal["reference", "pallas", "cudnn", "auto"]
IMPLEMENTATIONS = ("reference", "pallas", "cudnn", "auto")


def gather_pages(pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                 page_table: jax.Array,  # i32[batch, pages_per_seq]
                 ) -> jax.Array:
    """[batch, pages_per_seq * page_size, kv_heads, head_dim]: each sequence's KV, contiguous."""
    g = pages[:, page_table]  # [kv, batch, pps, page, hd]
    kv, b, pps, ps, hd = g.shape
    return g.transpose(1, 2, 3, 0, 4).reshape(b, pps * ps, kv, hd)


def _kv_positions(page_table: jax.Array, page_size: int, kv_lens: jax.Array) -> jax.Array:
    slots = jnp.arange(page_table.shape[1] * page_size, dtype=jnp.int32)[None, :]
    return jnp.where(slots < kv_lens[:, None], slots, -1)


def reference_attention(q: jax.Array,  # [batch, q_len, heads, head_dim]
                        k_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                        v_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                        page_table: jax.Array,  # i32[batch, pages_per_seq]
                        q_positions: jax.Array,  # i32[batch, q_len]; -1 = padding
                        kv_lens: jax.Array,  # i32[batch]: tokens in the cache, new ones included
                        *, sliding_window: int | None = None) -> jax.Array:
    k = gather_pages(k_pages, page_table)
    v = gather_pages(v_pages, page_table)
    kv_pos = _kv_positions(page_table, k_pages.shape[2], kv_lens)
    return causal_attention(q, k, v, q_positions, kv_pos, sliding_window=sliding_window)


def cudnn_attention(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                    sliding_window: int | None = None) -> jax.Array:
    k = gather_pages(k_pages, page_table)
    v = gather_pages(v_pages, page_table)
    kv_pos = _kv_positions(page_table, k_pages.shape[2], kv_lens)
    mask = (kv_pos[:, None, None, :] >= 0) & (kv_pos[:, None, None, :] <= q_positions[:, None, :, None])
    if sliding_window is not None:
        mask &= kv_pos[:, None, None, :] > q_positions[:, None, :, None] - sliding_window
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return out.astype(q.dtype)


AttentionFn = Callable[..., jax.Array]


def resolve(implementation: str, *, head_dim: int, dtype: str) -> tuple[str, AttentionFn, AttentionFn]:
    """(chosen name, prefill attention, decode attention), decided once at start-up."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    if implementation == "auto":
        fits = backend == "gpu" and dtype in ("bfloat16", "float16") and head_dim <= 128
        implementation = "cudnn" if fits else "reference"
    if implementation == "pallas":
        raise ConfigError("attention implementation 'pallas' is not available yet; "
                          "use 'reference', 'cudnn' (GPU) or 'auto'")
    if implementation == "cudnn":
        if backend != "gpu":
            raise ConfigError(f"attention implementation 'cudnn' needs a GPU (backend is {backend!r})")
        if dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"attention implementation 'cudnn' needs bfloat16 or float16, not {dtype}")
        return "cudnn", cudnn_attention, cudnn_attention
    return "reference", reference_attention, reference_attention
