"""Paged attention entry points agree with the contiguous reference on permuted page tables."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpd.engine.attention import paged_attention_jnp, gather_pages, reference_attention, resolve
from jaxpd.errors import ConfigError
from jaxpd.model.attention import causal_attention


def _case(seed, batch=3, heads=4, kv_heads=2, hd=8, page=4, pps=6, q_len=1):
    rng = np.random.default_rng(seed)
    pages = batch * pps + 1
    k = jnp.asarray(rng.normal(size=(kv_heads, pages, page, hd)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(kv_heads, pages, page, hd)), jnp.float32)
    table = jnp.asarray(1 + rng.permutation(batch * pps).reshape(batch, pps), jnp.int32)
    lens = jnp.asarray(rng.integers(q_len, page * pps + 1, batch), jnp.int32)
    q = jnp.asarray(rng.normal(size=(batch, q_len, heads, hd)), jnp.float32)
    qpos = lens[:, None] - q_len + jnp.arange(q_len)[None, :]
    return q, k, v, table, qpos, lens


def test_gather_pages_follows_the_page_table():
    q, k, v, table, qpos, lens = _case(0)
    g = gather_pages(k, table)
    np.testing.assert_array_equal(g[1, 4:8, 0], k[0, table[1, 1]])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [None, 5])
def test_blocked_decode_matches_reference(seed, window):
    q, k, v, table, qpos, lens = _case(seed)
    want = reference_attention(q, k, v, table, qpos, lens, sliding_window=window)
    got = paged_attention_jnp(q, k, v, table, qpos, lens, sliding_window=window, block_tokens=8)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_blocked_prefill_chunk_matches_reference(seed):
    q, k, v, table, qpos, lens = _case(seed, q_len=5)
    qpos = qpos.at[0, 3:].set(-1)  # padding queries in the chunk
    want = reference_attention(q, k, v, table, qpos, lens)
    got = paged_attention_jnp(q, k, v, table, qpos, lens, block_tokens=8)
    np.testing.assert_allclose(got[1:], want[1:], atol=1e-5)
    np.testing.assert_allclose(got[0, :3], want[0, :3], atol=1e-5)


def test_reference_prefill_matches_contiguous_attention():
    q, k, v, table, qpos, lens = _case(7, q_len=3)
    kc, vc = gather_pages(k, table), gather_pages(v, table)
    slots = jnp.arange(kc.shape[1])[None, :]
    want = causal_attention(q, kc, vc, qpos, jnp.where(slots < lens[:, None], slots, -1))
    np.testing.assert_allclose(reference_attention(q, k, v, table, qpos, lens), want, atol=1e-6)


def test_backend_choice_is_explicit():
    assert resolve("auto", head_dim=64, dtype="float32").name == "reference"
    with pytest.raises(ConfigError, match="'cudnn' needs a GPU"):
        resolve("cudnn", head_dim=64, dtype="bfloat16")
    with pytest.raises(ConfigError, match="is not one of"):
        resolve("flash", head_dim=64, dtype="float32")
