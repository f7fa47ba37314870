"""The TPU paged attention kernel, run in the TPU interpret mode on CPU (out-of-bounds reads
raise, uninitialised memory is NaN), against its pure-jnp reference and the engine's."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxpd.engine.attention import reference_attention
from jaxpd.kernels.tpu_paged_attention import (BlockSizes, interpret_params, paged_attention,
                                               paged_attention_reference,
                                               paged_attention_write_kv)
from kernel_cases import PAGE, paged_batch


def _check(args, *, window=None, soft_cap=None, tol=1e-5, pages_per_block=4):
    q, k, v, table, positions, lens = args
    got = paged_attention(q, k, v, table, positions, lens, sliding_window=window,
                          soft_cap=soft_cap, block_sizes=BlockSizes(pages_per_block),
                          interpret=interpret_params())
    want = paged_attention_reference(q, k, v, table, positions, lens, sliding_window=window,
                                     soft_cap=soft_cap)
    valid = np.asarray(positions) >= 0
    got32, want32 = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got32).all()  # no NaN from memory the kernel should not have read
    np.testing.assert_allclose(got32[valid], want32[valid], rtol=tol, atol=tol)
    assert np.all(got32[~valid] == 0)  # padding rows come out as zeros
    if soft_cap is None:  # the engine's own oracle agrees too
        engine = reference_attention(q, k, v, table, jnp.where(positions >= 0, positions, -1),
                                     lens, sliding_window=window)
        np.testing.assert_allclose(got32[valid], np.asarray(engine, np.float32)[valid],
                                   rtol=tol, atol=tol)


# decode token at a page boundary +-1, a chunk after a cached prefix, a length-1 row, padding
MIXED = [(33, 1), (47, 9), (1, 1), (0, 0), (16, 1), (64, 16)]


@pytest.mark.parametrize("group, dim, dtype, pages_per_block", [
    (1, 64, jnp.float32, 1), (4, 128, jnp.float32, 4),
    pytest.param(8, 64, jnp.bfloat16, 4, marks=pytest.mark.slow),
    pytest.param(4, 128, jnp.bfloat16, 8,  # 8 > the table's 6 columns: one block per row
                 marks=pytest.mark.slow),
])
def test_kernel_matches_reference_on_a_mixedpaged_batch(group, dim, dtype, pages_per_block):
    rng = np.random.default_rng(group * 1000 + dim)
    args = paged_batch(rng, kv_heads=2, group=group, dim=dim, dtype=dtype, rows=MIXED)
    _check(args, tol=1e-5 if dtype == jnp.float32 else 2e-2, pages_per_block=pages_per_block)


def test_shared_prefix_page_and_lengths_off_the_page_grid():
    rng = np.random.default_rng(7)
    args = paged_batch(rng, kv_heads=1, group=4, dim=64, dtype=jnp.float32,
                  rows=[(21, 5), (19, 1), (95, 1)], shared=True)
    _check(args)


@pytest.mark.slow
def test_sliding_window_and_soft_cap():
    rng = np.random.default_rng(11)
    args = paged_batch(rng, kv_heads=2, group=2, dim=64, dtype=jnp.float32,
                  rows=[(90, 1), (70, 12), (5, 5)])
    _check(args, window=20, pages_per_block=1)  # pages wholly before the window: never read
    _check(args, soft_cap=5.0)
    _check(args, window=33, soft_cap=30.0, pages_per_block=3)


def test_no_races_in_the_double_buffered_dmas():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter

    rng = np.random.default_rng(3)
    q, k, v, table, positions, lens = paged_batch(rng, kv_heads=2, group=2, dim=64,
                                             dtype=jnp.float32, rows=[(90, 4), (9, 1)])
    out = paged_attention(q, k, v, table, positions, lens, block_sizes=BlockSizes(2),
                          interpret=interpret_params(detect_races=True))
    jax.block_until_ready(out)
    assert interpreter.races is not None and not interpreter.races.races_found
    want = paged_attention_reference(q, k, v, table, positions, lens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_hlo_interpreter_agrees():
    """The engine on CPU runs the kernel with `interpret=True` (compiled to XLA loops)."""
    rng = np.random.default_rng(5)
    q, k, v, table, positions, lens = paged_batch(rng, kv_heads=2, group=4, dim=64,
                                             dtype=jnp.float32, rows=MIXED)
    fast = paged_attention(q, k, v, table, positions, lens, interpret=True)
    checked = paged_attention(q, k, v, table, positions, lens, interpret=interpret_params())
    np.testing.assert_allclose(np.asarray(fast), np.asarray(checked), rtol=1e-6, atol=1e-6)


def test_heads_must_divide():
    q = jnp.zeros((1, 1, 3, 64))
    k = jnp.zeros((2, 4, PAGE, 64))
    with pytest.raises(ValueError, match="do not divide"):
        paged_attention(q, k, k, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                        jnp.ones((1,), jnp.int32), interpret=interpret_params())


def _scatter(k_pages, new, table, positions):
    """What the engine's XLA scatter does: each new token's K (or V) into its page slot."""
    pool = np.array(k_pages)
    for b in range(positions.shape[0]):
        for t in range(positions.shape[1]):
            p = int(positions[b, t])
            if p >= 0:
                pool[:, int(table[b, p // PAGE]), p % PAGE] = np.asarray(new[b, t])
    return pool


@pytest.mark.parametrize("dtype, pages_per_block", [(jnp.float32, 2), (jnp.bfloat16, 4)])
def test_fused_kv_write_equals_scatter_then_attention(dtype, pages_per_block):
    """The new tokens' K/V land in the same slots, bit for bit, as the engine's scatter; the
    output equals attention over the scattered pool; no races between the writes and reads;
    a shared prefix page is read and never written."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter

    rng = np.random.default_rng(21)
    q, k, v, table, positions, lens = paged_batch(rng, kv_heads=2, group=2, dim=64, dtype=dtype,
                                             rows=[(21, 5), (19, 1), (0, 0), (40, 3)],
                                             shared=True)
    kv_heads, new_shape = k.shape[0], (*positions.shape, k.shape[0], k.shape[-1])
    k_new = jnp.asarray(rng.standard_normal(new_shape), dtype)
    v_new = jnp.asarray(rng.standard_normal(new_shape), dtype)
    k_want = _scatter(k, k_new, np.asarray(table), np.asarray(positions))
    v_want = _scatter(v, v_new, np.asarray(table), np.asarray(positions))
    assert kv_heads == 2 and not np.array_equal(k_want, np.asarray(k))
    want = paged_attention_reference(q, jnp.asarray(k_want), jnp.asarray(v_want), table,
                                     positions, lens)
    out, k_got, v_got = paged_attention_write_kv(
        q, k_new, v_new, k, v, table, positions, lens, block_sizes=BlockSizes(pages_per_block),
        interpret=interpret_params(detect_races=True))
    assert not interpreter.races.races_found
    np.testing.assert_array_equal(np.asarray(k_got), k_want)
    np.testing.assert_array_equal(np.asarray(v_got), v_want)
    valid = np.asarray(positions) >= 0
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32)[valid],
                               np.asarray(want, np.float32)[valid], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8"])
def test_an_8bit_pool_stores_what_the_engine_stores_and_attends_over_it_widened(dtype):
    """kv.dtype float8_e4m3fn or int8: the fused write stores the new bf16 K/V as the engine's
    jnp scatter does (e4m3 clipped to +-448, never NaN; int8 rows with their scale packed
    after them), bit for bit, and attention reads the 8-bit pages widened to float32 (equal to
    the reference on the same pool)."""
    from jaxpd.kv.dtypes import KV_DTYPES, to_storage

    narrow = KV_DTYPES[dtype]
    rng = np.random.default_rng(8)
    q, k, v, table, positions, lens = paged_batch(rng, kv_heads=2, group=2, dim=64,
                                                  dtype=jnp.bfloat16,
                                                  rows=[(21, 5), (19, 1), (40, 3)])
    k8, v8 = to_storage(k, narrow), to_storage(v, narrow)
    new_shape = (*positions.shape, k.shape[0], k.shape[-1])
    k_new = rng.standard_normal(new_shape).astype(np.float32) * 4
    k_new[0, 0, 0, :3] = [1e4, -1e4, 500.0]  # beyond e4m3's range
    k_new = jnp.asarray(k_new, jnp.bfloat16)
    v_new = jnp.asarray(rng.standard_normal(new_shape), jnp.bfloat16)
    k_want = _scatter(k8, to_storage(k_new, narrow), np.asarray(table), np.asarray(positions))
    v_want = _scatter(v8, to_storage(v_new, narrow), np.asarray(table), np.asarray(positions))
    out, k_got, v_got = paged_attention_write_kv(  # the pool is donated
        q, k_new, v_new, k8, v8, table, positions, lens, block_sizes=BlockSizes(2),
        interpret=interpret_params())
    assert k_got.dtype == narrow and k_got.shape[-1] == (64 if dtype != "int8" else 68)
    as_bits = (lambda x: np.asarray(x).view(np.uint8))  # noqa: E731
    np.testing.assert_array_equal(as_bits(k_got), as_bits(k_want))
    np.testing.assert_array_equal(as_bits(v_got), as_bits(v_want))
    if dtype == "float8_e4m3fn":
        assert float(np.asarray(k_got, np.float32).max()) == 448.0
    want = paged_attention_reference(q, jnp.asarray(k_want), jnp.asarray(v_want), table,
                                     positions, lens)
    valid = np.asarray(positions) >= 0
    got32 = np.asarray(out, np.float32)
    assert np.isfinite(got32).all()
    np.testing.assert_allclose(got32[valid], np.asarray(want, np.float32)[valid], rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize("kind", ["TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn, jnp.int8])
def test_both_kernels_lower_for_tpu_generations(kind, dtype):
    """Lowered by Mosaic TPU for each generation on this CPU machine (an AbstractMesh whose
    device names the TPU kind): block shapes, layouts and refs are checked without a TPU.
    (This caught the fused write slicing a row out of a squeezed block, which Mosaic refuses.)"""
    import functools

    from jax.sharding import AbstractDevice, AbstractMesh

    mesh = AbstractMesh((1,), ("tp",), abstract_device=AbstractDevice(
        device_kind=kind, num_cores=1, platform="tpu"))
    layers, kv_heads, pages, page, dim, batch, q_len = 2, 2, 64, 16, 128, 4, 8
    spec = jax.ShapeDtypeStruct
    q = spec((batch, q_len, 4 * kv_heads, dim), jnp.bfloat16)
    new = spec((batch, q_len, kv_heads, dim), jnp.bfloat16)
    row = dim + 4 if dtype == jnp.int8 else dim  # an int8 row carries its scale
    pool = spec((layers, kv_heads, pages, page, row), dtype)
    table, pos, lens = (spec((batch, 8), jnp.int32), spec((batch, q_len), jnp.int32),
                        spec((batch,), jnp.int32))
    sizes = BlockSizes.for_device(kind, page_bytes=page * row * jnp.dtype(dtype).itemsize)
    for fn, args in ((paged_attention, (q, pool, pool, table, pos, lens, 1)),
                     (paged_attention_write_kv, (q, new, new, pool, pool, table, pos, lens, 1))):
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jax.jit(functools.partial(fn, block_sizes=sizes)).trace(*args).lower(
                lowering_platforms=("tpu",))
        assert "tpu_custom_call" in lowered.as_text()


def test_block_sizes_per_generation():
    """Faster HBM -> more pages per DMA round; unknown devices get the fallback."""
    page = 16 * 128 * 2  # page 16, head dim 128, bf16
    v5e, v6e, v5p = (BlockSizes.for_device(kind, page_bytes=page).pages_per_block
                     for kind in ("TPU v5 lite", "TPU v6e", "TPU v5p"))
    assert 4 <= v5e <= v6e <= v5p <= 32
    assert BlockSizes.for_device("TPU v5 lite", page_bytes=page // 8).pages_per_block >= v5e
    assert BlockSizes.for_device("cpu", page_bytes=page) == BlockSizes()


@pytest.mark.slow
def test_stacked_pool_reads_and_writes_only_its_layer():
    """The engine hands the kernel the whole stacked pool and a traced layer index: it attends
    over that layer, writes the new K/V into that layer only, and every other layer comes back
    bit for bit (no slice of the pool is copied out and back)."""
    rng = np.random.default_rng(5)
    q, k, v, table, positions, lens = paged_batch(rng, kv_heads=2, group=2, dim=64,
                                                  dtype=jnp.float32, rows=[(21, 5), (19, 1)])
    layers = 3
    k_stack = jnp.stack([k * (i + 1) for i in range(layers)])
    v_stack = jnp.stack([v - i for i in range(layers)])
    new_shape = (*positions.shape, k.shape[0], k.shape[-1])
    k_new = jnp.asarray(rng.standard_normal(new_shape), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal(new_shape), jnp.float32)
    k_before, v_before = np.asarray(k_stack), np.asarray(v_stack)

    @jax.jit
    def run(k_stack, v_stack, layer):
        return paged_attention_write_kv(q, k_new, v_new, k_stack, v_stack, table, positions,
                                        lens, layer, block_sizes=BlockSizes(2),
                                        interpret=interpret_params())

    out, k_got, v_got = run(k_stack, v_stack, jnp.int32(1))
    k_want = _scatter(k_before[1], k_new, np.asarray(table), np.asarray(positions))
    v_want = _scatter(v_before[1], v_new, np.asarray(table), np.asarray(positions))
    np.testing.assert_array_equal(np.asarray(k_got)[1], k_want)
    np.testing.assert_array_equal(np.asarray(v_got)[1], v_want)
    for other in (0, 2):
        np.testing.assert_array_equal(np.asarray(k_got)[other], k_before[other])
        np.testing.assert_array_equal(np.asarray(v_got)[other], v_before[other])
    want = paged_attention_reference(q, jnp.asarray(k_want), jnp.asarray(v_want), table,
                                     positions, lens)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(want)[valid], rtol=1e-5,
                               atol=1e-5)
    read_only = paged_attention(q, k_got, v_got, table, positions, lens, 1,
                                block_sizes=BlockSizes(2), interpret=interpret_params())
    np.testing.assert_allclose(np.asarray(read_only)[valid], np.asarray(want)[valid],
                               rtol=1e-5, atol=1e-5)
