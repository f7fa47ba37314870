"""Sampling tested for effect: on a hand-built distribution, top-k and top-p exclude exactly
the tokens they should, and temperature sharpens (T < 1) and flattens (T > 1) the empirical
frequencies as softmax(logits / T) says."""

import numpy as np
import pytest

import jax.numpy as jnp

from jaxpd.engine.sampling import SamplingParams, sample, sampling_arrays

PROBS = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
DRAWS = 4000


def _draw(params: SamplingParams, seed: int = 7) -> np.ndarray:
    """DRAWS tokens from PROBS: one row per draw, same seed, counters 0..DRAWS-1 (as a request
    drawing token after token)."""
    logits = jnp.asarray(np.tile(np.log(PROBS), (DRAWS, 1)), jnp.float32)
    arrays = sampling_arrays([params] * DRAWS, [seed] * DRAWS, list(range(DRAWS)), DRAWS)
    tokens, _ = sample(logits, arrays)
    return np.asarray(tokens)


def _frequencies(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(tokens, minlength=len(PROBS)) / len(tokens)


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (1, 1.0, {0}), (2, 1.0, {0, 1}), (3, 1.0, {0, 1, 2}),
    # top-p keeps a token while the mass strictly above it is < p: 0 (0.0), 1 (0.4), 2 (0.7)
    (0, 0.75, {0, 1, 2}), (0, 0.5, {0, 1}), (0, 0.3, {0}),
    (2, 0.75, {0, 1}),  # both: the stricter wins
])
def test_top_k_and_top_p_exclude_exactly(top_k, top_p, allowed):
    tokens = _draw(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p))
    assert set(np.unique(tokens)) == allowed  # every allowed token appears, no other does
    kept = PROBS[sorted(allowed)]
    np.testing.assert_allclose(_frequencies(tokens)[sorted(allowed)], kept / kept.sum(), atol=0.03)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_reshapes_the_distribution(temperature):
    want = PROBS ** (1 / temperature)
    want /= want.sum()
    got = _frequencies(_draw(SamplingParams(temperature=temperature)))
    np.testing.assert_allclose(got, want, atol=0.025)


def test_sharper_and_flatter_than_the_model():
    cold = _frequencies(_draw(SamplingParams(temperature=0.5)))
    hot = _frequencies(_draw(SamplingParams(temperature=2.0)))
    assert cold[0] > PROBS[0] + 0.1 and cold[-1] < PROBS[-1]
    assert hot[0] < PROBS[0] - 0.05 and hot[-1] > PROBS[-1] + 0.03


def test_greedy_ignores_filters_and_logprobs_use_the_unmodified_distribution():
    logits = jnp.asarray(np.log(PROBS)[None], jnp.float32)
    arrays = sampling_arrays([SamplingParams(temperature=0.0, top_k=1)], [0], [0], 1)
    tokens, logprobs = sample(logits, arrays)
    assert int(tokens[0]) == 0
    assert float(logprobs[0]) == pytest.approx(np.log(0.4), abs=1e-5)
