"""Attention entry points over paged KV, one per phase, with the backend chosen once.

`implementation`:
  reference  pure jnp (runs everywhere): prefill gathers the sequence's pages for a masked f32
             softmax; decode runs an online softmax over blocks of pages
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


def decode_attention_blocked(q: jax.Array,  # [batch, 1, heads, head_dim]
                             k_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                             v_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                             page_table: jax.Array,  # i32[batch, pages_per_seq]
                             q_positions: jax.Array,  # i32[batch, 1]; -1 = padding
                             kv_lens: jax.Array,  # i32[batch]
                             *, sliding_window: int | None = None,
                             block_tokens: int = 32) -> jax.Array:
    """One query per sequence, an online softmax over blocks of pages (flash-decoding in jnp).

    Same result as `reference_attention`, but it never materialises every sequence's whole KV
    or its scores at once: on CPU that is several times faster, since each block stays in cache.
    """
    batch, _, heads, hd = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    group = heads // kv_heads
    per_block = max(1, block_tokens // page_size)
    pps = page_table.shape[1]
    blocks = -(-pps // per_block)
    table = jnp.pad(page_table, ((0, 0), (0, blocks * per_block - pps)))
    table = table.reshape(batch, blocks, per_block).transpose(1, 0, 2)  # [blocks, batch, per_block]
    qg = q[:, 0].reshape(batch, kv_heads, group, hd).astype(jnp.float32) * hd ** -0.5
    width = per_block * page_size
    qpos = q_positions[:, 0]

    def body(carry, xs):
        m, l, acc = carry
        index, cols = xs
        k = k_pages[:, cols].reshape(kv_heads, batch, width, hd)
        v = v_pages[:, cols].reshape(kv_heads, batch, width, hd)
        scores = jnp.einsum("bkgd,kbsd->bkgs", qg, k, preferred_element_type=jnp.float32)
        pos = index * width + jnp.arange(width)
        valid = (pos[None, :] < kv_lens[:, None]) & (pos[None, :] <= qpos[:, None])
        if sliding_window is not None:
            valid &= pos[None, :] > qpos[:, None] - sliding_window
        scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(scores - safe[..., None])
        correction = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
        l = l * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("bkgs,kbsd->bkgd", p, v.astype(jnp.float32))
        return (m_new, l, acc), None

    init = (jnp.full((batch, kv_heads, group), -jnp.inf), jnp.zeros((batch, kv_heads, group)),
            jnp.zeros((batch, kv_heads, group, hd)))
    (_, l, acc), _ = jax.lax.scan(body, init, (jnp.arange(blocks), table))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(batch, 1, heads, hd).astype(q.dtype)


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
    return "reference", reference_attention, decode_attention_blocked
