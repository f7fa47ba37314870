"""Paged attention for TPU (Pallas, Mosaic TPU backend): one kernel for decode tokens, prefill
chunks and prefix-cache hits in the same batch.

The engine's batch is `[batch, q_len]` rows padded with position -1, so a row can be one decode
token, a prefill chunk continuing a cached prefix, or padding: "ragged" by positions rather than
by a cumulative-length array. Each row's keys live in pages named by its page table, in the
layout `kv/layout.py` fixes (`[kv_heads, num_pages, page_size, head_dim]` per layer), so prefill,
decode and the KV hand-off share one layout and this kernel needs no other.

Tiling: grid `(batch, kv_heads, page)`. One block holds every query token of a row times every
query head of one KV head (GQA: the `group` heads that share it), so each page is read once per
KV head, not once per query head. The page axis is the online-softmax (flash) reduction: running
max, sum and accumulator live in VMEM scratch across it. The page table and KV lengths are
scalar-prefetched into SMEM, so the K/V BlockSpecs index pages through the table; pages past a
row's length repeat its last page's block index (so the pipeline fetches nothing new) and their
compute is skipped, as are pages wholly before a sliding window.

Masking: causal by absolute position (a key at position p is visible to a query at position q
when p <= q, p < kv_len and, with a window w, p > q - w), optional logit soft-cap
(`cap * tanh(s / cap)`). Padding rows (position -1) produce zeros.

Not yet: blocks of several pages per grid step through manual DMA (a page of 16 x 128 bf16 is
4 KiB, too small to saturate HBM on a real TPU), the new tokens' K/V written inside the kernel,
and per-generation block sizes measured on v5e/v5p/v6e: no TPU was available. `BlockSizes`
holds the knobs those will fill.

`paged_attention_reference` beside it is the pure-jnp oracle (gather every page, one masked
softmax); tests run the kernel in the TPU interpret mode on CPU against it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["BlockSizes", "paged_attention", "paged_attention_reference", "interpret_params"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling knobs. `pages_per_block` is 1 until the multi-page DMA path exists."""

    pages_per_block: int = 1

    @classmethod
    def for_device(cls, device_kind: str) -> BlockSizes:
        """Per-generation defaults (v5e, v5p, v6e); the fallback until they are measured."""
        return cls()


def interpret_params(detect_races: bool = False) -> pltpu.InterpretParams:
    """The TPU interpret mode used on CPU: out-of-bounds reads raise, uninitialised memory is
    NaN (so a read of something never written poisons the output)."""
    return pltpu.InterpretParams(detect_races=detect_races, out_of_bounds_reads="raise",
                                 uninitialized_memory="nan")


def _kernel(page_table_ref, kv_lens_ref, q_lo_ref,  # scalar prefetch (SMEM)
            q_ref, qpos_ref, k_ref, v_ref,  # VMEM blocks
            o_ref,
            m_ref, l_ref, acc_ref,  # VMEM scratch
            *, page_size: int, pages: int, scale: float, window: int | None,
            soft_cap: float | None):
    b, j = pl.program_id(0), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    length = kv_lens_ref[b]
    start = j * page_size
    visible = start < length
    if window is not None:  # the whole page is older than every query's window
        visible &= start + page_size > q_lo_ref[b] - window + 1

    @pl.when(visible)
    def _accumulate():
        q = q_ref[...].astype(jnp.float32) * scale  # [TG, D]
        k = k_ref[...].astype(jnp.float32)  # [PS, D]
        v = v_ref[...].astype(jnp.float32)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [TG, PS]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        qpos = qpos_ref[...]  # [TG, 1]
        kpos = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = (kpos < length) & (kpos <= qpos) & (qpos >= 0)
        if window is not None:
            mask &= kpos > qpos - window
        s = jnp.where(mask, s, -jnp.inf)
        m_prev = m_ref[...]  # [TG, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - safe)
        correction = jnp.exp(jnp.where(m_prev == -jnp.inf, -jnp.inf, m_prev - safe))
        l_ref[...] = l_ref[...] * correction + p.sum(axis=1, keepdims=True)
        acc_ref[...] = acc_ref[...] * correction + jnp.dot(p, v,
                                                           preferred_element_type=jnp.float32)
        m_ref[...] = m_new

    @pl.when(j == pages - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sliding_window", "soft_cap", "block_sizes",
                                             "interpret"))
def paged_attention(q: jax.Array,  # [batch, q_len, heads, head_dim]
                    k_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                    v_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                    page_table: jax.Array,  # i32[batch, pages_per_seq]
                    q_positions: jax.Array,  # i32[batch, q_len]; -1 = padding
                    kv_lens: jax.Array,  # i32[batch]: cached tokens, the new ones included
                    *, sliding_window: int | None = None, soft_cap: float | None = None,
                    block_sizes: BlockSizes = BlockSizes(),
                    interpret: pltpu.InterpretParams | bool = False) -> jax.Array:
    """Attention of each query token over its row's paged KV -> [batch, q_len, heads, dim]."""
    batch, q_len, heads, dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    if block_sizes.pages_per_block != 1:
        raise NotImplementedError("pages_per_block > 1 needs the multi-page DMA path")
    group = heads // kv_heads
    pages = page_table.shape[1]
    tg = q_len * group
    # [b, t, kv, g, d] -> [b, kv, t*g, d]: a block is every query of one KV head of one row
    qk = q.reshape(batch, q_len, kv_heads, group, dim).transpose(0, 2, 1, 3, 4)
    qk = qk.reshape(batch, kv_heads, tg, dim)
    qpos = jnp.broadcast_to(q_positions[:, :, None], (batch, q_len, group)).reshape(batch, tg, 1)
    valid = q_positions >= 0
    q_lo = jnp.min(jnp.where(valid, q_positions, jnp.iinfo(jnp.int32).max), axis=1)
    kv_lens = kv_lens.astype(jnp.int32)

    def kv_index_map(b, h, j, table, lens, lo):
        """Page j of row b through the table; past the row's last page, repeat that page (the
        pipeline then fetches nothing new and the kernel skips the compute)."""
        del lo
        last = jnp.maximum((lens[b] + page_size - 1) // page_size - 1, 0)
        return h, table[b * pages + jnp.minimum(j, last)], 0, 0

    kernel = functools.partial(_kernel, page_size=page_size, pages=pages, scale=dim ** -0.5,
                               window=sliding_window, soft_cap=soft_cap)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, tg, dim), q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, kv_heads, pages),
            in_specs=[
                pl.BlockSpec((None, None, tg, dim), lambda b, h, j, *_: (b, h, 0, 0)),
                pl.BlockSpec((None, tg, 1), lambda b, h, j, *_: (b, 0, 0)),
                pl.BlockSpec((None, None, page_size, dim), kv_index_map),
                pl.BlockSpec((None, None, page_size, dim), kv_index_map),
            ],
            out_specs=pl.BlockSpec((None, None, tg, dim), lambda b, h, j, *_: (b, h, 0, 0)),
            scratch_shapes=[pltpu.VMEM((tg, 1), jnp.float32),
                            pltpu.VMEM((tg, 1), jnp.float32),
                            pltpu.VMEM((tg, dim), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(page_table.reshape(-1).astype(jnp.int32), kv_lens, q_lo.astype(jnp.int32),
      qk, qpos.astype(jnp.int32), k_pages, v_pages)
    out = out.reshape(batch, kv_heads, q_len, group, dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, q_len, heads, dim)


def paged_attention_reference(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                              sliding_window: int | None = None,
                              soft_cap: float | None = None) -> jax.Array:
    """Pure jnp: gather each row's pages, one masked softmax in float32."""
    batch, q_len, heads, dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    group = heads // kv_heads
    k = k_pages[:, page_table].astype(jnp.float32)  # [kv, b, pages, ps, d]
    v = v_pages[:, page_table].astype(jnp.float32)
    k = k.reshape(kv_heads, batch, -1, dim)
    v = v.reshape(kv_heads, batch, -1, dim)
    qg = q.reshape(batch, q_len, kv_heads, group, dim).astype(jnp.float32) * dim ** -0.5
    s = jnp.einsum("btkgd,kbsd->bkgts", qg, k)
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    kpos = jnp.arange(k.shape[2])[None, None, None, None, :]
    qpos = q_positions[:, None, None, :, None]
    mask = (kpos < kv_lens[:, None, None, None, None]) & (kpos <= qpos) & (qpos >= 0)
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = p.sum(-1, keepdims=True)
    out = jnp.einsum("bkgts,kbsd->bkgtd", p, v) / jnp.where(l > 0, l, 1.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, dim).astype(q.dtype)
