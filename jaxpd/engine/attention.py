"""Attention entry points over paged KV, one per phase, with the backend chosen once.

`implementation`:
  reference  pure jnp (runs everywhere): an online softmax over blocks of pages, looping only
             over the blocks the batch uses; `reference_attention` (gather everything, one
             masked softmax) is the obviously-correct oracle it is tested against
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")` on the gathered pages (GPU)
  pallas     our Pallas kernels (`jaxpd.kernels`): on TPU the paged attention kernel compiled
             by Mosaic TPU (KV write fused); on GPU the Mosaic GPU kernel (bf16/f16, head dim
             64 or 128); on CPU the TPU kernel through Pallas's interpreter (for correctness,
             not speed)
  auto       Pallas on TPU; cudnn on GPU when it fits (the GPU Pallas kernel becomes the GPU
             default once it has been measured on a device; see docs/benchmarks.md); else
             reference

Every entry point takes `(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
sliding_window, mesh, layer)`; `mesh` lets a kernel that XLA cannot partition (a Pallas call)
run per TP shard under `shard_map`. With `layer`, the pages are the whole stacked pool
`[layers, kv_heads, pages, page_size, head_dim]` and the entry point reads that layer in place
(the jnp ones put the layer index into their gathers; the Pallas kernels address the layer
themselves), so no step copies a layer out of the pool.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from jaxpd.errors import ConfigError
from jaxpd.kv.dtypes import from_storage
from jaxpd.model.attention import causal_attention

Implementation = Literal["reference", "pallas", "cudnn", "auto"]
IMPLEMENTATIONS = ("reference", "pallas", "cudnn", "auto")


def _stacked(pages: jax.Array, layer) -> tuple[jax.Array, jax.Array | int]:
    """(a layer-stacked pool, the layer to read): one layer's pages become a stack of one."""
    return (pages[None], 0) if layer is None else (pages, layer)


def _pages_at(pages: jax.Array,  # [layers, kv_heads, num_pages, page_size, head_dim]
              layer, cols: jax.Array,  # i32[batch, n]
              ) -> jax.Array:
    """[batch, n * page_size, kv_heads, head_dim]: pages `cols` of `layer`, read by one gather.

    The layer index goes into the gather itself. Slicing the layer out first
    (`pages[layer][:, cols]`) makes XLA materialise that layer whenever the gather sits in a
    loop (the block loop below), a copy of the whole layer per call: that made the scanned
    stack 4.3x slower on CPU."""
    g = pages[layer, :, cols]  # [batch, n, kv_heads, page_size, head_dim]
    b, n, kv, ps, hd = g.shape
    return g.transpose(0, 1, 3, 2, 4).reshape(b, n * ps, kv, hd)


def gather_pages(pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim], or stacked
                 page_table: jax.Array,  # i32[batch, pages_per_seq]
                 layer=None) -> jax.Array:
    """[batch, pages_per_seq * page_size, kv_heads, head_dim]: each sequence's KV, contiguous
    (`layer` given: `pages` is the stacked pool and this reads that layer)."""
    return _pages_at(*_stacked(pages, layer), page_table)


def _kv_positions(page_table: jax.Array, page_size: int, kv_lens: jax.Array) -> jax.Array:
    slots = jnp.arange(page_table.shape[1] * page_size, dtype=jnp.int32)[None, :]
    return jnp.where(slots < kv_lens[:, None], slots, -1)


def reference_attention(q: jax.Array,  # [batch, q_len, heads, head_dim]
                        k_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                        v_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                        page_table: jax.Array,  # i32[batch, pages_per_seq]
                        q_positions: jax.Array,  # i32[batch, q_len]; -1 = padding
                        kv_lens: jax.Array,  # i32[batch]: tokens in the cache, new ones included
                        *, sliding_window: int | None = None, layer=None) -> jax.Array:
    hd = q.shape[-1]
    k = from_storage(gather_pages(k_pages, page_table, layer), hd)  # any storage dtype
    v = from_storage(gather_pages(v_pages, page_table, layer), hd)
    kv_pos = _kv_positions(page_table, k_pages.shape[-2], kv_lens)
    return causal_attention(q.astype(jnp.float32), k, v, q_positions, kv_pos,
                            sliding_window=sliding_window).astype(q.dtype)


def paged_attention_jnp(q: jax.Array,  # [batch, q_len, heads, head_dim]
                        k_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                        v_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
                        page_table: jax.Array,  # i32[batch, pages_per_seq]
                        q_positions: jax.Array,  # i32[batch, q_len]; -1 = padding
                        kv_lens: jax.Array,  # i32[batch]
                        *, sliding_window: int | None = None,
                        block_tokens: int = 32, mesh=None, layer=None) -> jax.Array:
    """Online softmax over blocks of pages (flash attention written in jnp).

    Same result as `reference_attention`, but it never materialises a sequence's whole KV or
    score row: each block of `block_tokens` keys is gathered, scored and folded into running
    max/sum/accumulator. The loop runs only over blocks some sequence in the batch uses (a
    dynamic trip count), so one compiled program serves every context length up to the
    page table's width, and short batches pay only for their own pages.
    """
    (k_pages, _), (v_pages, layer) = _stacked(k_pages, layer), _stacked(v_pages, layer)
    batch, q_len, heads, hd = q.shape
    kv_heads, _, page_size, _ = k_pages.shape[1:]
    group = heads // kv_heads
    per_block = max(1, min(block_tokens // page_size, page_table.shape[1]))
    pps = page_table.shape[1]
    blocks = -(-pps // per_block)
    table = jnp.pad(page_table, ((0, 0), (0, blocks * per_block - pps)))
    width = per_block * page_size
    qg = q.reshape(batch, q_len, kv_heads, group, hd).astype(jnp.float32) * hd ** -0.5
    qpos = q_positions[:, None, None, :, None]  # [b, 1, 1, t, 1]

    def body(index, carry):
        m, l, acc = carry
        cols = jax.lax.dynamic_slice_in_dim(table, index * per_block, per_block, axis=1)
        k = from_storage(_pages_at(k_pages, layer, cols), hd)  # f32 [b, width, kv, hd]
        v = from_storage(_pages_at(v_pages, layer, cols), hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k)
        pos = (index * width + jnp.arange(width))[None, None, None, None, :]
        valid = (pos < kv_lens[:, None, None, None, None]) & (pos <= qpos)
        if sliding_window is not None:
            valid &= pos > qpos - sliding_window
        scores = jnp.where(valid, scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(scores - safe[..., None])
        correction = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
        l = l * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p, v)
        return m_new, l, acc

    shape = (batch, kv_heads, group, q_len)
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (hd,)))
    used = (jnp.max(kv_lens) + width - 1) // width
    _, l, acc = jax.lax.fori_loop(0, jnp.minimum(used, blocks), body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [b, k, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, hd).astype(q.dtype)


def prefill_attention_jnp(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                          sliding_window: int | None = None, mesh=None, layer=None) -> jax.Array:
    return paged_attention_jnp(q, k_pages, v_pages, page_table, q_positions, kv_lens,
                               sliding_window=sliding_window, block_tokens=128, layer=layer)


def cudnn_attention(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                    sliding_window: int | None = None, mesh=None, layer=None) -> jax.Array:
    hd = q.shape[-1]  # an 8-bit pool widens here
    k = from_storage(gather_pages(k_pages, page_table, layer), hd).astype(q.dtype)
    v = from_storage(gather_pages(v_pages, page_table, layer), hd).astype(q.dtype)
    kv_pos = _kv_positions(page_table, k_pages.shape[-2], kv_lens)
    mask = (kv_pos[:, None, None, :] >= 0) & (kv_pos[:, None, None, :] <= q_positions[:, None, :, None])
    if sliding_window is not None:
        mask &= kv_pos[:, None, None, :] > q_positions[:, None, :, None] - sliding_window
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return out.astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class WritesKV:
    """An entry point that also writes the new tokens' K/V into the pool, in the same kernel
    call: `fn(q, k_new, v_new, k_pages, v_pages, page_table, q_positions, kv_lens, *,
    sliding_window, mesh) -> (out, k_pages, v_pages)`. The model step then skips its own
    scatter pass."""

    fn: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _per_tp_shard(run, mesh, args, *, writes_kv: bool):
    """Run a Pallas call (which XLA cannot partition) once per TP shard: query heads, new K/V
    heads and stored KV heads split together over `tp` (kv/layout.py keeps every rank's query
    heads beside their KV head). The last argument is the layer index (replicated)."""
    if mesh is None or mesh.shape.get("tp", 1) == 1:
        return run(*args)
    from jax.sharding import PartitionSpec as P

    heads = P(None, None, "tp", None)
    stacked = args[3 if writes_kv else 1].ndim == 5
    pages = P(None, "tp", None, None, None) if stacked else P("tp", None, None, None)
    if writes_kv:
        in_specs = (heads, heads, heads, pages, pages, P(), P(), P(), P())
        out_specs = (heads, pages, pages)
    else:
        in_specs, out_specs = (heads, pages, pages, P(), P(), P(), P()), heads
    return jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)


def pallas_tpu_attention(q, k_new, v_new, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                         sliding_window: int | None = None, mesh=None, layer=0,
                         interpret: bool = False):
    """The TPU Pallas kernel, KV write fused, per TP shard; a stacked pool is updated in place
    at `layer`."""
    from jaxpd.kernels import tpu_paged_attention as kernel

    # On CPU: Pallas's HLO interpreter, which compiles the kernel's grid into XLA loops (fast
    # enough to serve); the kernel tests use the TPU interpret mode, which also checks bounds,
    # uninitialised reads and races, but is too slow to run an engine on.
    page_size, head_dim = k_pages.shape[-2:]
    sizes = kernel.BlockSizes.for_device(
        jax.devices()[0].device_kind, page_bytes=page_size * head_dim * k_pages.dtype.itemsize)
    run = functools.partial(kernel.paged_attention_write_kv, sliding_window=sliding_window,
                            block_sizes=sizes, interpret=interpret)
    return _per_tp_shard(run, mesh, (q, k_new, v_new, k_pages, v_pages, page_table,
                                     q_positions, kv_lens, jnp.asarray(layer, jnp.int32)),
                         writes_kv=True)


def pallas_gpu_attention(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                         sliding_window: int | None = None, mesh=None, layer=0):
    """The Mosaic GPU Pallas kernel (decode with split-K, prefill chunks), per TP shard; it
    reads `layer` of a stacked pool in place."""
    from jaxpd.kernels import gpu_paged_attention as kernel

    run = functools.partial(kernel.paged_attention, sliding_window=sliding_window)
    return _per_tp_shard(run, mesh, (q, k_pages, v_pages, page_table, q_positions, kv_lens,
                                     jnp.asarray(layer, jnp.int32)), writes_kv=False)


AttentionFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    name: str
    prefill: AttentionFn
    decode: AttentionFn
    # True: cost follows the pages actually used, so one wide page table (one compiled shape)
    # serves every context length. False: cost follows the table width, so bucket it.
    fixed_table_width: bool


def resolve(implementation: str, *, head_dim: int, dtype: str,
            kv_dtype: str | None = None) -> AttentionBackend:
    """The backend for `implementation`, decided once at start-up (`dtype`: the model's;
    `kv_dtype`: the pool's, when it stores another)."""
    kv_dtype = kv_dtype or dtype
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    if implementation == "auto":
        fits = backend == "gpu" and dtype in ("bfloat16", "float16") and head_dim <= 128
        implementation = "pallas" if backend == "tpu" else "cudnn" if fits else "reference"
    if implementation == "pallas":
        if backend == "gpu":
            from jaxpd.kernels.gpu_paged_attention import supported

            if not supported(dtype, head_dim) or kv_dtype != dtype:
                raise ConfigError(f"attention implementation 'pallas' on GPU needs bfloat16 or "
                                  f"float16 and head_dim 64 or 128, with the KV pool in the "
                                  f"model's dtype (the model has {dtype}, head_dim {head_dim}, "
                                  f"KV {kv_dtype}); use 'cudnn' or 'reference'")
            return AttentionBackend("pallas", pallas_gpu_attention, pallas_gpu_attention, True)
        fn = WritesKV(functools.partial(pallas_tpu_attention, interpret=backend != "tpu"))
        return AttentionBackend("pallas", fn, fn, True)
    if implementation == "cudnn":
        if backend != "gpu":
            raise ConfigError(f"attention implementation 'cudnn' needs a GPU (backend is {backend!r})")
        if dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"attention implementation 'cudnn' needs bfloat16 or float16, not {dtype}")
        return AttentionBackend("cudnn", cudnn_attention, cudnn_attention, False)
    return AttentionBackend("reference", prefill_attention_jnp, paged_attention_jnp, True)
