"""The model's two entry points agree with each other and with hand-worked references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpd.model import forward
from jaxpd.model.attention import causal_attention
from jaxpd.model.config import ModelConfig, RopeScaling
from jaxpd.model.presets import PRESETS, get_preset
from jaxpd.model.rope import apply_rope, inverse_frequencies
from jaxpd.errors import ConfigError

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def params():
    return forward.init_params(TINY, jax.random.key(0))


def test_decode_step_matches_full_prefill(params):
    tokens = jnp.array([[5, 9, 11, 40, 7, 3, 2], [17, 8, 99, 0, 0, 0, 0]], jnp.int32)
    lengths = jnp.array([7, 3])
    full = forward.prefill(params, tokens, lengths, config=TINY, all_logits=True)
    # Prefill all but the last real token, then decode that token against the cache.
    head = forward.prefill(params, tokens[:, :6], lengths - 1, config=TINY)
    grow = ((0, 0), (0, 0), (0, 10), (0, 0), (0, 0))
    cache = forward.StackedKV(jnp.pad(head.kv.k, grow), jnp.pad(head.kv.v, grow))
    last = tokens[jnp.arange(2), lengths - 1]
    logits, _ = forward.decode(params, last, cache, lengths - 1, config=TINY)
    np.testing.assert_allclose(logits[0], full.logits[0, 6], atol=1e-5)
    np.testing.assert_allclose(logits[1], full.logits[1, 2], atol=1e-5)


def test_padding_does_not_change_a_prompt(params):
    alone = forward.prefill(params, jnp.array([[3, 1, 4, 1, 5]]), jnp.array([5]), config=TINY)
    padded = forward.prefill(params, jnp.array([[3, 1, 4, 1, 5, 0, 0, 0], [2, 7, 0, 0, 0, 0, 0, 0]]),
                             jnp.array([5, 2]), config=TINY)
    np.testing.assert_allclose(alone.logits[0], padded.logits[0], atol=1e-5)


def test_attention_reference_hand_worked():
    # One head, two keys: the second query sees both keys with equal scores -> mean of values.
    q = jnp.zeros((1, 2, 1, 2))
    k = jnp.zeros((1, 2, 1, 2))
    v = jnp.array([[[[1.0, 0.0]], [[3.0, 2.0]]]])
    pos = jnp.array([[0, 1]])
    out = causal_attention(q, k, v, pos, pos)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 0.0])
    np.testing.assert_allclose(out[0, 1, 0], [2.0, 1.0])
    windowed = causal_attention(q, k, v, pos, pos, sliding_window=1)
    np.testing.assert_allclose(windowed[0, 1, 0], [3.0, 2.0])


def test_gqa_matches_mha_with_repeated_kv():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    grouped = causal_attention(q, k, v, pos, pos)
    full = causal_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), pos, pos)
    np.testing.assert_allclose(grouped, full, atol=1e-6)


def test_llama3_rope_frequencies_hand_worked():
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=8, rope_theta=500000.0,
                      rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 256))
    base = 1.0 / 500000.0 ** (np.arange(0, 8, 2) / 8)
    wavelen = 2 * math.pi / base  # ~6.3 (kept), ~167 (blended), ~4400 and ~118000 (divided by 8)
    smooth = (256 / wavelen[1] - 1.0) / 3.0
    want = [base[0], (1 - smooth) * base[1] / 8 + smooth * base[1], base[2] / 8, base[3] / 8]
    np.testing.assert_allclose(inverse_frequencies(cfg), want, rtol=1e-6)


def test_rope_rotates_pairs_and_preserves_norm():
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    inv = np.array([1.0, 0.5, 0.25, 0.125], np.float32)
    out = apply_rope(x, jnp.array([[0]]), inv)
    np.testing.assert_allclose(out, x)  # position 0 is the identity
    out = apply_rope(x, jnp.array([[3]]), inv)
    np.testing.assert_allclose(jnp.linalg.norm(out), jnp.linalg.norm(x), rtol=1e-6)
    angle = 3 * 1.0  # first pair (x[0], x[4]) rotated by 3 rad
    np.testing.assert_allclose(out[0, 0, 0, [0, 4]],
                               [0 * math.cos(angle) - 4 * math.sin(angle),
                                4 * math.cos(angle) + 0 * math.sin(angle)], rtol=1e-5)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "llama3-70b" else n
                                  for n in sorted(PRESETS)])  # 70b: 80 layers to trace
def test_presets_have_consistent_shapes(name):
    cfg = PRESETS[name]
    shapes = jax.eval_shape(lambda: forward.init_params(cfg, jax.random.key(0)))
    count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    assert count == cfg.num_params()


def test_llama3_8b_shape_figures():
    cfg = get_preset("llama3-8b")
    assert 8.0e9 < cfg.num_params() < 8.1e9
    assert cfg.kv_bytes_per_token() == 128 * 1024  # bf16: 2 x 32 layers x 8 heads x 128 x 2 bytes


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        TINY.replace(num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="dtype='int8'"):
        TINY.replace(dtype="int8")
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        get_preset("nope")


def test_config_round_trips_through_dict():
    for cfg in PRESETS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
