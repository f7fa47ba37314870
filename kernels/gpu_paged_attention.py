"""Paged attention for NVIDIA Hopper (Pallas, Mosaic GPU backend): decode steps and prefill
chunks over the page pool, one kernel, with split-K over pages for long decode contexts.

Why Mosaic GPU: JAX 0.11 deprecates the Pallas Triton backend (`jax/experimental/pallas/ops/
gpu/attention.py` and `paged_attention.py` warn on import); Mosaic GPU is where JAX's own Hopper
kernels now live (`ops/gpu/attention_mgpu.py`, FlashAttention-3 style), and it exposes what a
Hopper attention kernel needs: TMA copies with mbarriers, and wgmma from shared memory. Its
lowering runs on any machine, so the test suite lowers this kernel for CUDA on a CPU-only host
(`jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))`) and catches layout, shape and
transform errors without a GPU. `jax_triton` was the alternative; it needs a GPU even to compile
and adds a CUDA-only dependency, so it stays out until a measurement says Triton is faster.

Tiling. Queries are packed GQA-style: row `r` of a KV head's block is query token `r // group`,
head `r % group` (the `group` query heads that share the KV head), so a page is read once per
KV head, and a decode step's 1 x group rows and a prefill chunk's t x group rows are the same
kind of block. Grid `(row_blocks * splits, kv_heads, batch)`: one warpgroup per block runs a
flash-attention loop over the row's KV in blocks of `kv_tokens` keys (whole pages); each block's pages
arrive by one TMA per page (addressed through the page table) into one of two shared-memory
slots, the next block's copies in flight while wgmma scores the current one. Scores use exp2
with the softmax scale folded in.

Split-K. A decode step has few rows, so long contexts would leave most SMs idle; `splits`
divides each row block's KV blocks into contiguous ranges run by different CTAs. Each writes its
normalised partial output and log-sum-exp (base 2); `combine_splits` merges them exactly. A
prefill chunk has enough row blocks and runs with one split.

Masking by multiplication, not division: with row `r` of token `r // group` at position
`q_start + r // group`, a key at position p is visible when `(p - q_start) * group <= r`
(causal), `r < (p + window - q_start) * group` (window), `p < kv_len` and `r < q_len * group`
(padding rows). This needs each row's query positions contiguous (`q_start`, `q_start + 1`,
...), which is how the engine builds its batches (runner.py); padding sits at the end.

`paged_attention_tiled` runs exactly this tiling, block ranges, masks, online softmax and
combine in plain jnp, through the same helper functions the kernel calls: the CPU tests check
it against the reference (kernels/tpu_paged_attention.py's `paged_attention_reference`), and
the GPU test (tests/test_kernels_gpu.py) checks the kernel itself whenever a GPU is present.
Not measured yet: no GPU was lent while it was written (see docs/benchmarks.md for the plan).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxpd.kernels.tpu_paged_attention import paged_attention_reference

__all__ = ["BlockSizes", "paged_attention", "paged_attention_tiled", "combine_splits",
           "paged_attention_reference", "supported"]

_LOG2E = math.log2(math.e)
_MASKED = -1e30  # finite: a row whose first blocks are all masked must not produce inf - inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling knobs. `block_q` rows (token x head pairs) per CTA, a multiple of 64 (wgmma's M);
    `kv_tokens` keys per step (whole pages: at least one page), a multiple of 64; `max_splits`
    caps split-K; `target_ctas` is how many CTAs split-K aims for (about two per H100 SM)."""

    block_q: int = 64
    kv_tokens: int = 64
    max_splits: int = 16
    target_ctas: int = 264

    def block_kv(self, page_size: int) -> int:
        return max(self.kv_tokens, page_size)

    def pages_per_block(self, page_size: int) -> int:
        return self.block_kv(page_size) // page_size

    def splits_for(self, ctas: int, kv_blocks: int) -> int:
        """Split-K factor: enough CTAs to fill the GPU, never more splits than KV blocks."""
        want = -(-self.target_ctas // max(ctas, 1))
        return max(1, min(self.max_splits, want, kv_blocks))


def supported(dtype, head_dim: int) -> bool:
    """wgmma takes 16-bit operands; the swizzled tiles want head_dim a multiple of 64."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and \
        head_dim in (64, 128)


# -- pieces shared by the kernel and its jnp emulation ------------------------------------------

def _pack_rows(q: jax.Array, kv_heads: int, block_q: int) -> jax.Array:
    """[b, t, heads, d] -> [b, rows, kv_heads, d], row = token * group + head-in-group, rows
    padded to a multiple of `block_q`."""
    batch, t, heads, dim = q.shape
    group = heads // kv_heads
    rows = q.reshape(batch, t, kv_heads, group, dim).transpose(0, 1, 3, 2, 4)
    rows = rows.reshape(batch, t * group, kv_heads, dim)
    padded = -(-(t * group) // block_q) * block_q
    return jnp.pad(rows, ((0, 0), (0, padded - t * group), (0, 0), (0, 0)))


def _unpack_rows(out: jax.Array, t: int, heads: int) -> jax.Array:
    """[b, rows, kv_heads, d] -> [b, t, heads, d] (inverse of `_pack_rows`)."""
    batch, _, kv_heads, dim = out.shape
    group = heads // kv_heads
    out = out[:, :t * group].reshape(batch, t, group, kv_heads, dim).transpose(0, 1, 3, 2, 4)
    return out.reshape(batch, t, heads, dim)


def _query_span(q_positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(first position, number of real tokens) of each row; positions must be contiguous."""
    valid = q_positions >= 0
    q_len = valid.sum(axis=1).astype(jnp.int32)
    q_start = jnp.where(q_len > 0, q_positions[:, 0], 0).astype(jnp.int32)
    return q_start, q_len


def _kv_block_range(q_start, q_len, row0, split, *, group: int, block_q: int, block_kv: int,
                    splits: int, window: int | None):
    """(first KV block, number of KV blocks) this CTA walks: the keys its rows can see
    (causal end, window start), divided into `splits` contiguous ranges."""
    last_token = jnp.minimum((row0 + block_q - 1) // group, q_len - 1)
    kv_end = jnp.where(last_token >= 0, q_start + last_token + 1, 0)
    kv_begin = 0
    if window is not None:
        kv_begin = jnp.maximum(q_start + row0 // group - window + 1, 0)
    first = kv_begin // block_kv
    total = jnp.maximum((kv_end + block_kv - 1) // block_kv - first, 0)
    per_split = (total + splits - 1) // splits
    lo = first + split * per_split
    count = jnp.clip(total - split * per_split, 0, per_split)
    return lo, count


def _visible(rows, kv_pos, q_start, q_len, kv_len, *, group: int, window: int | None):
    """Which (row, key) pairs attend (see the module docstring for why no division)."""
    ok = ((kv_pos - q_start) * group <= rows) & (kv_pos < kv_len) & (rows < q_len * group)
    if window is not None:
        ok = ok & (rows < (kv_pos + window - q_start) * group)
    return ok


def _scores(qk, *, scale: float, soft_cap: float | None):
    """Raw q.k -> logits in base-2 units (log2(e) and the softmax scale folded in)."""
    if soft_cap is not None:
        return jnp.tanh(qk * (scale / soft_cap)) * (soft_cap * _LOG2E)
    return qk * (scale * _LOG2E)


def _finish(acc, m, l):
    """Normalised partial output and its log2-sum-exp2; rows that saw no visible key (padding,
    or a split with nothing for them) give zeros and -inf, so the combine weighs them 0."""
    seen = m > _MASKED / 2
    safe = jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m + jnp.log2(safe), -jnp.inf)
    inverse = jnp.where(seen, 1.0 / safe, 0.0)
    return acc * lax.broadcast_in_dim(inverse, acc.shape, [0]), lse


def combine_splits(out: jax.Array,  # f32[splits, b, rows, kv_heads, d], each split normalised
                   lse: jax.Array,  # f32[splits, b, kv_heads, rows], base 2
                   ) -> jax.Array:
    """Exact merge of split-K partials: weights 2^(lse_s - max lse) -> f32[b, rows, kv, d]."""
    lse = lse.transpose(0, 1, 3, 2)[..., None]  # [s, b, rows, kv, 1]
    top = jnp.max(lse, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp2(lse - top)  # 0 for splits that saw nothing
    total = w.sum(axis=0)
    return (w * out).sum(axis=0) / jnp.where(total > 0, total, 1.0)


def _stacked(pages: jax.Array) -> jax.Array:
    """A one-layer pool `[kv_heads, pages, page_size, dim]` as a stack of one layer."""
    return pages[None] if pages.ndim == 4 else pages


def _plan(q, k_pages, page_table, block_sizes: BlockSizes):
    batch, t, heads, dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape[-4:]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    group = heads // kv_heads
    block_kv = block_sizes.block_kv(page_size)
    row_blocks = -(-(t * group) // block_sizes.block_q)
    kv_blocks = -(-(page_table.shape[1] * page_size) // block_kv)
    splits = block_sizes.splits_for(row_blocks * kv_heads * batch, kv_blocks)
    return group, block_kv, row_blocks, splits


# -- the Mosaic GPU kernel ----------------------------------------------------------------------

def _kernel(q_ref, k_ref, v_ref, table_ref, qstart_ref, qlen_ref, layer_ref, o_ref, lse_ref,
            q_smem, k_smem, v_smem, o_smem, lse_smem, q_bar, k_bar, v_bar, *,
            group: int, block_q: int, page_size: int, pages_per_block: int, splits: int,
            window: int | None, soft_cap: float | None, scale: float):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    block_kv = page_size * pages_per_block
    rs, h, b = lax.axis_index("rs"), lax.axis_index("h"), lax.axis_index("b")
    k_ref, v_ref = k_ref.at[layer_ref[0]], v_ref.at[layer_ref[0]]  # this layer of the stack
    row_block, split = lax.div(rs, splits), lax.rem(rs, splits)
    row0 = row_block * block_q
    q_start, q_len = qstart_ref[b], qlen_ref[b]
    kv_len = q_start + q_len
    last_page = jnp.maximum(kv_len - 1, 0) // page_size
    lo, count = _kv_block_range(q_start, q_len, row0, split, group=group, block_q=block_q,
                                block_kv=block_kv, splits=splits, window=window)

    def fetch(kv_block, slot):  # one TMA per page; both barriers expect pages_per_block arrivals
        for i in range(pages_per_block):
            page = table_ref[b, jnp.minimum(kv_block * pages_per_block + i, last_page)]
            dst = pl.ds(i * page_size, page_size)
            plgpu.copy_gmem_to_smem(k_ref.at[h, page], k_smem.at[slot, dst], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[h, page], v_smem.at[slot, dst], v_bar.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, block_q), h], q_smem, q_bar)

    @pl.when(count > 0)
    def _first():
        fetch(lo, 0)

    plgpu.barrier_wait(q_bar)
    wgmma = plgpu.Layout.WGMMA
    rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0, layout=wgmma) + row0
    cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=wgmma)
    m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), wgmma.reduce(1))
    l = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), wgmma.reduce(1))
    acc = plgpu.layout_cast(jnp.full((block_q, q_smem.shape[-1]), 0.0, jnp.float32), wgmma)

    def step(i, carry):
        acc, m, l = carry
        slot = lax.rem(i, 2)

        @pl.when(i + 1 < count)
        def _prefetch():  # the other slot was last read by step i - 1, whose wgmmas finished
            fetch(lo + i + 1, 1 - slot)

        plgpu.barrier_wait(k_bar.at[slot])

        def qk_scope(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]

        s = _scores(pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_kv), jnp.float32)),
                    scale=scale, soft_cap=soft_cap)
        kv_pos = (lo + i) * block_kv + cols
        s = jnp.where(_visible(rows, kv_pos, q_start, q_len, kv_len, group=group,
                               window=window), s, _MASKED)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(v_smem.dtype), v_smem.at[slot])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        return acc, m_new, l

    acc, m, l = lax.fori_loop(0, count, step, (acc, m, l))
    out, lse = _finish(acc, m, l)
    o_smem[...] = out
    lse_smem[...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, b, pl.ds(row0, block_q), h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, b, h, pl.ds(row0, block_q)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("sliding_window", "soft_cap", "block_sizes"))
def paged_attention(q: jax.Array,  # [batch, q_len, heads, head_dim], bf16 or f16
                    k_pages: jax.Array,  # [(layers,) kv_heads, num_pages, page_size, head_dim]
                    v_pages: jax.Array,  # the same shape
                    page_table: jax.Array,  # i32[batch, pages_per_seq]
                    q_positions: jax.Array,  # i32[batch, q_len]: contiguous, -1 padding at the end
                    kv_lens: jax.Array,  # i32[batch]; must equal last position + 1 (causal)
                    layer: jax.Array | int = 0,  # which layer of a stacked pool (read in place)
                    *, sliding_window: int | None = None, soft_cap: float | None = None,
                    block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """Attention of each query token over its row's paged KV -> [batch, q_len, heads, dim]."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    del kv_lens  # implied by the contiguous positions (q_start + q_len)
    batch, t, heads, dim = q.shape
    k_pages, v_pages = _stacked(k_pages), _stacked(v_pages)
    _, kv_heads, _, page_size, _ = k_pages.shape
    if not supported(q.dtype, dim) or k_pages.dtype != q.dtype:
        raise ValueError(f"the Mosaic GPU kernel takes bf16/f16 q and pages with head_dim 64 or "
                         f"128; got q {q.dtype}, pages {k_pages.dtype}, head_dim {dim}")
    group, block_kv, row_blocks, splits = _plan(q, k_pages, page_table, block_sizes)
    if block_kv % 64:
        raise ValueError(f"{block_kv} keys per step (BlockSizes.kv_tokens, whole pages) must be "
                         f"a multiple of 64")
    q_rows = _pack_rows(q, kv_heads, block_sizes.block_q)
    q_start, q_len = _query_span(q_positions)
    padded_rows = q_rows.shape[1]
    swizzle = min(128, dim * q.dtype.itemsize)
    tiles = (plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)),
             plgpu.SwizzleTransform(swizzle))
    kernel = functools.partial(
        _kernel, group=group, block_q=block_sizes.block_q, page_size=page_size,
        pages_per_block=block_sizes.pages_per_block(page_size), splits=splits,
        window=sliding_window, soft_cap=soft_cap, scale=dim ** -0.5)
    out, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((splits, batch, padded_rows, kv_heads, dim), jnp.float32),
                  jax.ShapeDtypeStruct((splits, batch, kv_heads, padded_rows), jnp.float32)),
        grid=(row_blocks * splits, kv_heads, batch),
        grid_names=("rs", "h", "b"),
        scratch_types=[
            plgpu.SMEM((block_sizes.block_q, dim), q.dtype, transforms=tiles),
            plgpu.SMEM((2, block_kv, dim), q.dtype, transforms=tiles),
            plgpu.SMEM((2, block_kv, dim), q.dtype, transforms=tiles),
            plgpu.SMEM((block_sizes.block_q, dim), jnp.float32),
            plgpu.SMEM((block_sizes.block_q,), jnp.float32),
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=block_sizes.pages_per_block(page_size), num_barriers=2),
            plgpu.Barrier(num_arrivals=block_sizes.pages_per_block(page_size), num_barriers=2),
        ],
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q_rows, k_pages, v_pages, page_table.astype(jnp.int32), q_start, q_len,
      jnp.asarray(layer, jnp.int32).reshape(1))
    return _unpack_rows(combine_splits(out, lse), t, heads).astype(q.dtype)


# -- the same tiling in plain jnp (runs on CPU) -------------------------------------------------

@functools.partial(jax.jit, static_argnames=("sliding_window", "soft_cap", "block_sizes"))
def paged_attention_tiled(q, k_pages, v_pages, page_table, q_positions, kv_lens, layer=0, *,
                          sliding_window: int | None = None, soft_cap: float | None = None,
                          block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """What `paged_attention` computes, block by block, in jnp: packed rows, each CTA's KV block
    range and split, the per-page fetch with its clamp, masks, exp2 online softmax, combine."""
    del kv_lens
    batch, t, heads, dim = q.shape
    k_pages, v_pages = _stacked(k_pages)[layer], _stacked(v_pages)[layer]
    kv_heads, _, page_size, _ = k_pages.shape
    group, block_kv, row_blocks, splits = _plan(q, k_pages, page_table, block_sizes)
    block_q, per_block = block_sizes.block_q, block_sizes.pages_per_block(page_size)
    q_rows = _pack_rows(q, kv_heads, block_q)
    q_start, q_len = _query_span(q_positions)

    def cta(row_block, split, h, b):
        row0 = row_block * block_q
        kv_len = q_start[b] + q_len[b]
        last_page = jnp.maximum(kv_len - 1, 0) // page_size
        lo, count = _kv_block_range(q_start[b], q_len[b], row0, split, group=group,
                                    block_q=block_q, block_kv=block_kv, splits=splits,
                                    window=sliding_window)
        qb = lax.dynamic_slice_in_dim(q_rows[b, :, h], row0, block_q).astype(jnp.float32)
        rows = jnp.arange(block_q)[:, None] + row0
        cols = jnp.arange(block_kv)[None, :]

        def step(i, carry):
            acc, m, l = carry
            index = jnp.minimum((lo + i) * per_block + jnp.arange(per_block), last_page)
            pages = page_table[b, index]
            k = k_pages[h, pages].reshape(block_kv, dim).astype(jnp.float32)
            v = v_pages[h, pages].reshape(block_kv, dim).astype(jnp.float32)
            s = _scores(qb @ k.T, scale=dim ** -0.5, soft_cap=soft_cap)
            kv_pos = (lo + i) * block_kv + cols
            s = jnp.where(_visible(rows, kv_pos, q_start[b], q_len[b], kv_len, group=group,
                                   window=sliding_window), s, _MASKED)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            l = l * alpha + p.sum(axis=1)
            acc = acc * alpha[:, None] + p.astype(v_pages.dtype).astype(jnp.float32) @ v
            return acc, m_new, l

        init = (jnp.zeros((block_q, dim)), jnp.full((block_q,), -jnp.inf), jnp.zeros((block_q,)))
        return _finish(*lax.fori_loop(0, count, step, init))

    grid = jnp.meshgrid(jnp.arange(row_blocks), jnp.arange(splits), jnp.arange(kv_heads),
                        jnp.arange(batch), indexing="ij")
    out, lse = jax.vmap(cta)(*(g.reshape(-1) for g in grid))
    # [rb, s, h, b, block_q, ...] -> the kernel's output layouts
    out = out.reshape(row_blocks, splits, kv_heads, batch, block_q, dim)
    out = out.transpose(1, 3, 0, 4, 2, 5).reshape(splits, batch, row_blocks * block_q, kv_heads, dim)
    lse = lse.reshape(row_blocks, splits, kv_heads, batch, block_q)
    lse = lse.transpose(1, 3, 2, 0, 4).reshape(splits, batch, kv_heads, row_blocks * block_q)
    return _unpack_rows(combine_splits(out, lse), t, heads).astype(q.dtype)
