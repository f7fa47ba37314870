"""The Mosaic GPU paged attention kernel.

On CPU: its tiling (packed GQA rows, per-CTA KV block ranges, split-K, per-page fetch with the
clamp, masks, exp2 online softmax, exact combine) runs in `paged_attention_tiled` against the
reference, and the kernel itself is lowered for CUDA (Mosaic GPU's lowering checks layouts,
transforms and the shared-memory budget without a GPU). On a GPU: the kernel against the
reference on the same cases.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxpd.kernels import gpu_paged_attention as gpu
from kernel_cases import paged_batch

ON_GPU = jax.default_backend() == "gpu"

# (kv_len, new tokens): decode tokens at a page boundary +-1, a chunk after a cached prefix,
# a length-1 row, an empty (padding) row, a full chunk starting at 0
MIXED = [(33, 1), (47, 9), (1, 1), (0, 0), (16, 1), (64, 16)]
SPLIT_K = gpu.BlockSizes(max_splits=4, target_ctas=10_000)  # forces several splits per row


def _compare(got, want, positions, tol):
    valid = np.asarray(positions) >= 0
    got32, want32 = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got32).all()
    np.testing.assert_allclose(got32[valid], want32[valid], rtol=tol, atol=tol)
    assert np.all(got32[~valid] == 0)  # padding rows come out as zeros


def _check(fn, args, *, window=None, soft_cap=None, tol, block_sizes=gpu.BlockSizes()):
    q, k, v, table, positions, lens = args
    got = fn(q, k, v, table, positions, lens, sliding_window=window, soft_cap=soft_cap,
             block_sizes=block_sizes)
    want = gpu.paged_attention_reference(q, k, v, table, positions, lens, sliding_window=window,
                                         soft_cap=soft_cap)
    _compare(got, want, positions, tol)


CASES = [  # group (GQA ratio), head dim, dtype, tiling
    (1, 64, jnp.float32, gpu.BlockSizes()),
    (4, 128, jnp.float32, SPLIT_K),
    (8, 64, jnp.bfloat16, SPLIT_K),
    (4, 128, jnp.bfloat16, gpu.BlockSizes(kv_tokens=128)),
]


@pytest.mark.parametrize("group, dim, dtype, block_sizes", CASES)
def test_tiling_matches_reference_on_a_mixed_batch(group, dim, dtype, block_sizes):
    rng = np.random.default_rng(group * 100 + dim)
    args = paged_batch(rng, kv_heads=2, group=group, dim=dim, dtype=dtype, rows=MIXED,
                       pages_per_seq=8)
    _check(gpu.paged_attention_tiled, args, block_sizes=block_sizes,
           tol=1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("window, soft_cap", [(20, None), (5, None), (None, 30.0), (17, 8.0)])
def test_tiling_window_and_soft_cap(window, soft_cap):
    rng = np.random.default_rng(7)
    args = paged_batch(rng, kv_heads=2, group=4, dim=64, dtype=jnp.float32, shared=True,
                       rows=[(100, 1), (90, 20), (3, 3), (128, 64)], pages_per_seq=8)
    for block_sizes in (gpu.BlockSizes(), SPLIT_K):
        _check(gpu.paged_attention_tiled, args, window=window, soft_cap=soft_cap, tol=1e-5,
               block_sizes=block_sizes)


def test_tiling_reads_the_named_layer_of_a_stacked_pool():
    rng = np.random.default_rng(9)
    q, k, v, table, positions, lens = paged_batch(rng, kv_heads=2, group=4, dim=64,
                                                  dtype=jnp.float32, rows=MIXED, pages_per_seq=8)
    k_stack, v_stack = jnp.stack([k * 0, k, k * 2]), jnp.stack([v * 0, v, v + 1])
    got = gpu.paged_attention_tiled(q, k_stack, v_stack, table, positions, lens, 1)
    _compare(got, gpu.paged_attention_reference(q, k, v, table, positions, lens), positions, 1e-5)


def test_split_k_combine_is_exact():
    """Any split of the keys, merged by log-sum-exp weights, equals the unsplit softmax."""
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((5, 40)) * 4
    values = rng.standard_normal((40, 8))
    want = (np.exp(scores - scores.max(1, keepdims=True)) /
            np.exp(scores - scores.max(1, keepdims=True)).sum(1, keepdims=True)) @ values
    parts, lses = [], []
    for lo, hi in [(0, 7), (7, 8), (8, 8), (8, 40)]:  # uneven, one key, and an empty split
        s = scores[:, lo:hi] * np.log2(np.e)
        m = s.max(1) if hi > lo else np.full(5, -np.inf)
        p = np.exp2(s - m[:, None]) if hi > lo else np.zeros((5, 0))
        l = p.sum(1)
        parts.append(p @ values[lo:hi] / np.where(l > 0, l, 1)[:, None])
        lses.append(np.where(l > 0, m + np.log2(np.where(l > 0, l, 1)), -np.inf))
    out = np.stack(parts)[:, None, :, None, :]  # [splits, b=1, rows, kv=1, d]
    lse = np.stack(lses)[:, None, None, :]  # [splits, b=1, kv=1, rows]
    got = gpu.combine_splits(jnp.asarray(out, jnp.float32), jnp.asarray(lse, jnp.float32))
    np.testing.assert_allclose(np.asarray(got)[0, :, 0], want, rtol=1e-5, atol=1e-5)


def test_split_count_fills_the_gpu_without_empty_splits():
    sizes = gpu.BlockSizes(max_splits=16, target_ctas=264)
    assert sizes.splits_for(ctas=8, kv_blocks=64) == 16  # batch 1: split-K to fill SMs
    assert sizes.splits_for(ctas=8, kv_blocks=3) == 3  # never more splits than KV blocks
    assert sizes.splits_for(ctas=512, kv_blocks=64) == 1  # a big batch fills the GPU alone


LOWERINGS = [  # batch, q tokens, heads, kv heads, head dim, page size, window, soft cap
    # (the pool is stacked over 4 layers; the kernel reads a traced layer of it)
    (4, 1, 32, 8, 128, 16, None, None),  # Llama-3-8B decode
    (1, 1, 8, 1, 64, 16, None, None),  # GQA 8, head dim 64, batch 1: split-K
    (2, 1, 8, 8, 128, 16, 100, 30.0),  # no GQA, window and soft cap
    (2, 64, 32, 8, 128, 16, None, None),  # prefill chunk
    (1, 128, 32, 4, 128, 32, 256, None),  # page size 32, window
]


@pytest.mark.parametrize("batch, t, heads, kv_heads, dim, page, window, cap", LOWERINGS)
def test_kernel_lowers_for_cuda(batch, t, heads, kv_heads, dim, page, window, cap):
    s = jax.ShapeDtypeStruct
    pool = s((4, kv_heads, 256, page, dim), jnp.bfloat16)
    args = (s((batch, t, heads, dim), jnp.bfloat16), pool, pool, s((batch, 32), jnp.int32),
            s((batch, t), jnp.int32), s((batch,), jnp.int32), s((), jnp.int32))
    fn = lambda *a: gpu.paged_attention(*a, sliding_window=window, soft_cap=cap)  # noqa: E731
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_kernel_refuses_what_wgmma_cannot_take():
    q = jnp.zeros((1, 1, 4, 96), jnp.bfloat16)
    pages = jnp.zeros((1, 4, 16, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        gpu.paged_attention(q, pages, pages, jnp.zeros((1, 2), jnp.int32),
                            jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    assert not gpu.supported(jnp.float32, 128) and gpu.supported(jnp.bfloat16, 128)


@pytest.mark.skipif(not ON_GPU, reason="runs the Mosaic GPU kernel; needs an NVIDIA GPU")
@pytest.mark.parametrize("group, dim, block_sizes", [
    (1, 64, gpu.BlockSizes()), (4, 128, SPLIT_K), (8, 64, SPLIT_K),
    (4, 128, gpu.BlockSizes(kv_tokens=128))])
def test_kernel_on_gpu(group, dim, block_sizes):
    rng = np.random.default_rng(group * 100 + dim)
    args = paged_batch(rng, kv_heads=2, group=group, dim=dim, dtype=jnp.bfloat16, rows=MIXED,
                       pages_per_seq=8, shared=True)
    _check(gpu.paged_attention, args, block_sizes=block_sizes, tol=2e-2)
    args = paged_batch(rng, kv_heads=2, group=group, dim=dim, dtype=jnp.bfloat16, shared=True,
                       rows=[(100, 1), (90, 20), (3, 3), (128, 64)], pages_per_seq=8)
    _check(gpu.paged_attention, args, window=17, soft_cap=8.0, block_sizes=block_sizes, tol=2e-2)
