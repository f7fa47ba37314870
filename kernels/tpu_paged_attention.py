"""Paged attention for TPU (Pallas, Mosaic TPU backend): one kernel for decode tokens, prefill
chunks and prefix-cache hits in the same batch.

The engine's batch is `[batch, q_len]` rows padded with position -1, so a row can be one decode
token, a prefill chunk continuing a cached prefix, or padding: "ragged" by positions rather than
by a cumulative-length array. Each row's keys live in pages named by its page table, in the
layout `kv/layout.py` fixes (`[kv_heads, num_pages, page_size, head_dim]` per layer), so prefill,
decode and the KV hand-off share one layout and this kernel needs no other.

Tiling: grid `(batch, kv_heads)`. One block holds every query token of a row times every query
head of one KV head (GQA: the `group` heads that share it), so each page is read once per KV
head, not once per query head. The pages stay in HBM; the kernel walks the row's pages in
blocks of `BlockSizes.pages_per_block`, each block brought into one of two VMEM slots by DMAs
addressed through the scalar-prefetched page table, the next block's DMAs in flight while the
current block is scored (double buffering). The blocks are the online-softmax (flash)
reduction: running max, sum and accumulator are the loop's carry. The loop covers only the
row's used pages (`kv_len`), starting at the first block a sliding window still sees; past the
row's last page a block re-reads that page, masked.

Masking: causal by absolute position (a key at position p is visible to a query at position q
when p <= q, p < kv_len and, with a window w, p > q - w), optional logit soft-cap
(`cap * tanh(s / cap)`). Padding rows (position -1) produce zeros.

`paged_attention_write_kv` is the same kernel with the new tokens' K/V written into their
page slots first, in the same call (one small DMA per token and KV head, into the pool aliased
in and out), so the engine skips its separate scatter pass over the pool.

Not yet: `pages_per_block` measured per TPU generation (`BlockSizes.for_device` derives it from
each generation's HBM bandwidth) and batched write DMAs for long prefill chunks: no TPU was
available.

`paged_attention_reference` beside it is the pure-jnp oracle (gather every page, one masked
softmax); tests run the kernel in the TPU interpret mode on CPU against it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxpd.kv.dtypes import from_storage, to_storage

__all__ = ["BlockSizes", "paged_attention", "paged_attention_write_kv",
           "paged_attention_reference", "interpret_params"]


# HBM bandwidth (bytes/s) per TPU generation, by a substring of `device.device_kind`
_HBM_BYTES_PER_S = {"v5 lite": 819e9, "v5e": 819e9, "v5p": 2765e9, "v6": 1640e9, "v4": 1228e9}
_STEP_SECONDS = 0.5e-6  # about what one pipeline step costs beyond its DMAs: hide it
_MAX_PAGES_PER_BLOCK = 32  # past the row's end a block re-reads its last page: cap the waste


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling knobs: pages brought into VMEM per DMA round (one block of the online softmax).
    More pages per block mean longer DMAs and bigger matmuls, and more VMEM (two slots of
    `pages_per_block x page_size x head_dim` for K and for V)."""

    pages_per_block: int = 8

    @classmethod
    def for_device(cls, device_kind: str, *, page_bytes: int) -> BlockSizes:
        """Per-generation default: enough pages that one round's K+V DMAs take longer than a
        pipeline step's fixed cost at that generation's HBM bandwidth (v5e < v6e < v5p), as a
        power of two up to a cap. Derived, not yet measured on a TPU; 8 on anything unknown.
        `page_bytes` is one page of K (or V) for one KV head."""
        kind = device_kind.lower()
        bandwidth = next((bw for name, bw in _HBM_BYTES_PER_S.items() if name in kind), None)
        if bandwidth is None:
            return cls()
        pages = bandwidth * _STEP_SECONDS / (2 * page_bytes)
        return cls(min(_MAX_PAGES_PER_BLOCK, max(4, 1 << max(0, math.ceil(math.log2(pages))))))


def interpret_params(detect_races: bool = False) -> pltpu.InterpretParams:
    """The TPU interpret mode used on CPU: out-of-bounds reads raise, uninitialised memory is
    NaN (so a read of something never written poisons the output)."""
    return pltpu.InterpretParams(detect_races=detect_races, out_of_bounds_reads="raise",
                                 uninitialized_memory="nan")


class _PageBlockCopy:
    """The DMAs that bring `pages_per_block` pages of one KV head from HBM into one VMEM slot;
    they share a semaphore, and waiting on each descriptor waits for its own bytes."""

    def __init__(self, pages_hbm, buffer, sem, table, row_offset, first_page, last_page,
                 head, slot, pages_per_block):
        self.copies = []
        for i in range(pages_per_block):
            page = jnp.minimum(first_page + i, last_page)  # past the row's end: re-read the last
            self.copies.append(pltpu.make_async_copy(
                pages_hbm.at[head, table[row_offset + page]], buffer.at[slot, i], sem.at[slot]))

    def start(self):
        for c in self.copies:
            c.start()

    def wait(self):
        for c in self.copies:
            c.wait()


def _widen(rows: jax.Array, dim: int) -> jax.Array:
    """Stored rows [W, row] as float32 [W, dim]: a float pool's rows cast; an int8 pool's rows
    (dim int8 values, then their float32 scale's 4 bytes, jaxpd/kv/dtypes.py) scaled back."""
    if rows.dtype != jnp.int8:
        return rows.astype(jnp.float32)
    b = rows[:, dim:dim + 4].astype(jnp.int32) & 0xFF  # the scale's bytes, little-endian
    bits = b[:, 0:1] | (b[:, 1:2] << 8) | (b[:, 2:3] << 16) | (b[:, 3:4] << 24)
    scale = jax.lax.bitcast_convert_type(bits, jnp.float32)  # [W, 1]
    return rows[:, :dim].astype(jnp.float32) * scale


def _attend(layer_ref, page_table_ref, kv_lens_ref, q_lo_ref,  # scalar prefetch (SMEM)
            q_ref, qpos_ref, k_hbm, v_hbm,  # q blocks in VMEM; the stacked pool stays in HBM
            o_ref,
            k_buf, v_buf, k_sem, v_sem,  # VMEM double buffers and their DMA semaphores
            *, page_size: int, pages: int, pages_per_block: int, scale: float,
            window: int | None, soft_cap: float | None):
    b, h = pl.program_id(0), pl.program_id(1)
    k_hbm, v_hbm = k_hbm.at[layer_ref[0]], v_hbm.at[layer_ref[0]]  # this layer's pages
    length = kv_lens_ref[b]
    used = (length + page_size - 1) // page_size
    last_page = jnp.clip(used - 1, 0, pages - 1)
    first_block = 0
    if window is not None:  # blocks wholly older than every query's window are never read
        first_visible = jnp.maximum(q_lo_ref[b] - window + 1, 0)
        first_block = jnp.minimum(first_visible // page_size, last_page) // pages_per_block
    blocks = (used + pages_per_block - 1) // pages_per_block
    width = pages_per_block * page_size

    def copies(block, slot):
        first = block * pages_per_block
        return (_PageBlockCopy(k_hbm, k_buf, k_sem, page_table_ref, b * pages, first, last_page,
                               h, slot, pages_per_block),
                _PageBlockCopy(v_hbm, v_buf, v_sem, page_table_ref, b * pages, first, last_page,
                               h, slot, pages_per_block))

    q = q_ref[...].astype(jnp.float32) * scale  # [TG, D]
    dim = q.shape[-1]  # stored rows may be wider (an int8 row's scale follows its values)
    qpos = qpos_ref[...]  # [TG, 1]

    @pl.when(first_block < blocks)
    def _prefetch_first():
        for c in copies(first_block, 0):
            c.start()

    def body(block, carry):
        m_prev, l_prev, acc_prev = carry
        slot = (block - first_block) % 2
        for c in copies(block, slot):
            c.wait()

        @pl.when(block + 1 < blocks)
        def _prefetch_next():  # overlaps the next block's DMA with this block's math
            for c in copies(block + 1, 1 - slot):
                c.start()

        k = _widen(k_buf[slot].reshape(width, -1), dim)  # [W, D] whatever the pool stores
        v = _widen(v_buf[slot].reshape(width, -1), dim)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [TG, W]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kpos = block * width + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = (kpos < length) & (kpos <= qpos) & (qpos >= 0)
        if window is not None:
            mask &= kpos > qpos - window
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - safe)
        correction = jnp.exp(jnp.where(m_prev == -jnp.inf, -jnp.inf, m_prev - safe))
        l_new = l_prev * correction + p.sum(axis=1, keepdims=True)
        acc_new = acc_prev * correction + jnp.dot(p, v, preferred_element_type=jnp.float32)
        return m_new, l_new, acc_new

    tg, dim = q.shape
    init = (jnp.full((tg, 1), -jnp.inf, jnp.float32), jnp.zeros((tg, 1), jnp.float32),
            jnp.zeros((tg, dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(first_block, blocks, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def _write_then_attend(layer_ref, page_table_ref, kv_lens_ref, q_lo_ref, positions_ref,  # SMEM
                       q_ref, qpos_ref, k_new_ref, v_new_ref, k_in, v_in,
                       o_ref, k_hbm, v_hbm,  # k_hbm/v_hbm alias k_in/v_in: the donated pool
                       k_buf, v_buf, k_sem, v_sem, w_sem, *, q_len: int, **attend):
    """Write this row's new K/V (this KV head) into their page slots, then attend over the
    pool with them in it: one call instead of a scatter pass plus an attention pass."""
    del k_in, v_in  # the same buffers as k_hbm / v_hbm
    b, h = pl.program_id(0), pl.program_id(1)
    page_size, pages = attend["page_size"], attend["pages"]

    def write(t, carry):
        pos = positions_ref[b * q_len + t]

        @pl.when(pos >= 0)
        def _write():
            page = page_table_ref[b * pages + pos // page_size]
            slot = pos % page_size
            for new, pool in ((k_new_ref, k_hbm), (v_new_ref, v_hbm)):
                copy = pltpu.make_async_copy(new.at[0, 0, pl.ds(t, 1)],
                                             pool.at[layer_ref[0], h, page, pl.ds(slot, 1)],
                                             w_sem.at[0])
                copy.start()
                copy.wait()
        return carry

    jax.lax.fori_loop(0, q_len, write, 0)
    _attend(layer_ref, page_table_ref, kv_lens_ref, q_lo_ref, q_ref, qpos_ref, k_hbm, v_hbm,
            o_ref, k_buf, v_buf, k_sem, v_sem, **attend)


@functools.partial(jax.jit, static_argnames=("sliding_window", "soft_cap", "block_sizes",
                                             "interpret"))
def paged_attention(q: jax.Array,  # [batch, q_len, heads, head_dim]
                    k_pages: jax.Array,  # [(layers,) kv_heads, num_pages, page_size, head_dim]
                    v_pages: jax.Array,  # the same shape
                    page_table: jax.Array,  # i32[batch, pages_per_seq]
                    q_positions: jax.Array,  # i32[batch, q_len]; -1 = padding
                    kv_lens: jax.Array,  # i32[batch]: cached tokens, the new ones included
                    layer: jax.Array | int = 0,  # which layer of a stacked pool
                    *, sliding_window: int | None = None, soft_cap: float | None = None,
                    block_sizes: BlockSizes = BlockSizes(),
                    interpret: pltpu.InterpretParams | bool = False) -> jax.Array:
    """Attention of each query token over its row's paged KV -> [batch, q_len, heads, dim].
    A stacked pool stays whole: the kernel addresses `layer`'s pages in it (no slice copy)."""
    batch, q_len, heads, dim = q.shape
    k_pages, v_pages = _stacked(k_pages), _stacked(v_pages)
    _, kv_heads, _, page_size, _ = k_pages.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    group = heads // kv_heads
    pages = page_table.shape[1]
    per_block = max(1, min(block_sizes.pages_per_block, pages))
    tg = q_len * group
    qk, qpos, q_lo = _query_blocks(q, q_positions, kv_heads)
    kernel = functools.partial(_attend, page_size=page_size, pages=pages,
                               pages_per_block=per_block, scale=dim ** -0.5,
                               window=sliding_window, soft_cap=soft_cap)
    buffer = pltpu.VMEM((2, per_block, page_size, k_pages.shape[-1]), k_pages.dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, tg, dim), q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, kv_heads),
            in_specs=[
                pl.BlockSpec((None, None, tg, dim), lambda b, h, *_: (b, h, 0, 0)),
                pl.BlockSpec((None, tg, 1), lambda b, h, *_: (b, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=pl.BlockSpec((None, None, tg, dim), lambda b, h, *_: (b, h, 0, 0)),
            scratch_shapes=[buffer, buffer, pltpu.SemaphoreType.DMA((2,)),
                            pltpu.SemaphoreType.DMA((2,))]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
    )(_layer_index(layer), page_table.reshape(-1).astype(jnp.int32), kv_lens.astype(jnp.int32),
      q_lo, qk, qpos, k_pages, v_pages)
    return _unblock(out, q_len, group)


@functools.partial(jax.jit, static_argnames=("sliding_window", "soft_cap", "block_sizes",
                                             "interpret"), donate_argnames=("k_pages", "v_pages"))
def paged_attention_write_kv(q: jax.Array,  # [batch, q_len, heads, head_dim]
                             k_new: jax.Array,  # [batch, q_len, kv_heads, head_dim]
                             v_new: jax.Array,  # [batch, q_len, kv_heads, head_dim]
                             k_pages: jax.Array,  # [(layers,) kv_heads, pages, page_size, dim]
                             v_pages: jax.Array,  # (both donated)
                             page_table: jax.Array, q_positions: jax.Array, kv_lens: jax.Array,
                             layer: jax.Array | int = 0,
                             *, sliding_window: int | None = None, soft_cap: float | None = None,
                             block_sizes: BlockSizes = BlockSizes(),
                             interpret: pltpu.InterpretParams | bool = False,
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`paged_attention` with the new tokens' K/V written into their pages in the same call
    (padding tokens, position -1, write nothing): -> (out, k_pages, v_pages), the pool
    updated in place (a stacked pool whole: only `layer`'s pages are written)."""
    batch, q_len, heads, dim = q.shape
    given = k_pages.ndim
    k_pages, v_pages = _stacked(k_pages), _stacked(v_pages)
    _, kv_heads, _, page_size, _ = k_pages.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    group, pages = heads // kv_heads, page_table.shape[1]
    per_block = max(1, min(block_sizes.pages_per_block, pages))
    tg = q_len * group
    qk, qpos, q_lo = _query_blocks(q, q_positions, kv_heads)
    to_heads = lambda x: to_storage(x.transpose(0, 2, 1, 3), k_pages.dtype)  # noqa: E731 [b,kv,t,d]
    kernel = functools.partial(_write_then_attend, q_len=q_len, page_size=page_size,
                               pages=pages, pages_per_block=per_block, scale=dim ** -0.5,
                               window=sliding_window, soft_cap=soft_cap)
    buffer = pltpu.VMEM((2, per_block, page_size, k_pages.shape[-1]), k_pages.dtype)
    rows = lambda b, h, *_: (b, h, 0, 0)  # noqa: E731
    out, k_pages, v_pages = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((batch, kv_heads, tg, dim), q.dtype),
                   jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(batch, kv_heads),
            in_specs=[pl.BlockSpec((None, None, tg, dim), rows),
                      pl.BlockSpec((None, tg, 1), lambda b, h, *_: (b, 0, 0)),
                      # not squeezed: Mosaic cannot slice a row (pl.ds) out of a ref whose
                      # block squeezes leading dims (a tpu.memref_slice verification error)
                      pl.BlockSpec((1, 1, q_len, k_pages.shape[-1]), rows),  # stored rows
                      pl.BlockSpec((1, 1, q_len, k_pages.shape[-1]), rows),
                      pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[pl.BlockSpec((None, None, tg, dim), rows),
                       pl.BlockSpec(memory_space=pl.ANY),
                       pl.BlockSpec(memory_space=pl.ANY)],
            scratch_shapes=[buffer, buffer, pltpu.SemaphoreType.DMA((2,)),
                            pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((1,))]),
        # operands count the 5 scalar-prefetch arrays: k_pages is operand 9, v_pages 10
        input_output_aliases={9: 1, 10: 2},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
    )(_layer_index(layer), page_table.reshape(-1).astype(jnp.int32), kv_lens.astype(jnp.int32),
      q_lo, q_positions.reshape(-1).astype(jnp.int32), qk, qpos, to_heads(k_new),
      to_heads(v_new), k_pages, v_pages)
    if given == 4:
        k_pages, v_pages = k_pages[0], v_pages[0]
    return _unblock(out, q_len, group), k_pages, v_pages


def _stacked(pages: jax.Array) -> jax.Array:
    """A one-layer pool `[kv_heads, pages, page_size, dim]` as a stack of one layer."""
    return pages[None] if pages.ndim == 4 else pages


def _layer_index(layer: jax.Array | int) -> jax.Array:
    return jnp.asarray(layer, jnp.int32).reshape(1)


def _query_blocks(q: jax.Array, q_positions: jax.Array, kv_heads: int):
    """[b, t, heads, d] -> [b, kv, t*g, d] (a block is every query of one KV head of one row),
    positions broadcast to match, and each row's lowest position (for the window)."""
    batch, q_len, heads, dim = q.shape
    group = heads // kv_heads
    qk = q.reshape(batch, q_len, kv_heads, group, dim).transpose(0, 2, 1, 3, 4)
    qk = qk.reshape(batch, kv_heads, q_len * group, dim)
    qpos = jnp.broadcast_to(q_positions[:, :, None], (batch, q_len, group))
    qpos = qpos.reshape(batch, q_len * group, 1).astype(jnp.int32)
    valid = q_positions >= 0
    q_lo = jnp.min(jnp.where(valid, q_positions, jnp.iinfo(jnp.int32).max), axis=1)
    return qk, qpos, q_lo.astype(jnp.int32)


def _unblock(out: jax.Array, q_len: int, group: int) -> jax.Array:
    batch, kv_heads, _, dim = out.shape
    out = out.reshape(batch, kv_heads, q_len, group, dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, q_len, kv_heads * group, dim)


def paged_attention_reference(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                              sliding_window: int | None = None,
                              soft_cap: float | None = None) -> jax.Array:
    """Pure jnp: gather each row's pages, one masked softmax in float32."""
    batch, q_len, heads, dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    group = heads // kv_heads
    k = from_storage(k_pages[:, page_table], dim)  # f32 [kv, b, pages, ps, d], any pool dtype
    v = from_storage(v_pages[:, page_table], dim)
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
