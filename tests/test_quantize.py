"""FP8 weights (model/quantize.py): the rounding stays within e4m3's precision, the stored
bytes are what the cost model counts, and the engine on them matches the full-precision one
and itself across TP layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import deployment
from jaxpd.config import parse_config
from jaxpd.engine.builder import build_engine
from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.errors import ConfigError
from jaxpd.model.checkpoint import load_model
from jaxpd.model.quantize import FP8, dequantize_weight, quantize_params, quantize_weight
from jaxpd.model.sharding import make_mesh

PROMPTS = [tuple(range(3, 3 + n)) for n in (5, 17, 40)]


def test_each_weight_rounds_within_e4m3s_precision_of_itself():
    """Three mantissa bits: at most 1/16 of the value off (half a step), or half the smallest
    subnormal step of the row's scale for values near zero; a zero row stays zero."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32) * rng.uniform(1e-3, 10, (64, 1))
    w[3] = 0.0
    q, scale = quantize_weight(jnp.asarray(w))
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (64,)
    back = np.asarray(dequantize_weight(q, scale, jnp.float32))
    bound = np.abs(w) / 16 + np.asarray(scale)[:, None] * 2.0 ** -10
    assert np.all(np.abs(back - w) <= bound * (1 + 1e-6))
    assert np.all(back[3] == 0) and np.all(np.abs(back).max(axis=1) <= np.abs(w).max(axis=1) * 1.07)


@pytest.fixture(scope="module")
def models():
    return load_model(), load_model(weight_dtype=FP8)


def _greedy(model, dep, n=16):
    engine = build_engine(model.config, model.params, dep)
    out = engine.run_to_completion([Request(f"r{i}", p, SamplingParams(max_tokens=n,
                                                                       ignore_eos=True))
                                    for i, p in enumerate(PROMPTS)])
    return [list(out[f"r{i}"].token_ids) for i in range(len(PROMPTS))]


def test_fp8_weights_store_what_the_cost_model_counts_and_keep_the_greedy_tokens(models):
    full, fp8 = models
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert fp8.config.weight_dtype == FP8 and full.config.weight_dtype is None
    assert nbytes(fp8.params) == fp8.config.weight_bytes()
    assert nbytes(full.params) == full.config.weight_bytes()
    assert fp8.config.weight_bytes() < 0.5 * full.config.weight_bytes()  # f32 layers -> 1 byte
    again = quantize_params(fp8.params, FP8)  # a quantized tree is left as it is
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(fp8.params)))
    dep = deployment(page_size=16, num_pages=256)
    want, got = _greedy(full, dep), _greedy(fp8, dep)
    agree = np.mean([a == b for x, y in zip(want, got) for a, b in zip(x, y)])
    assert agree >= 0.9, (want, got)  # the embedded model: every token agrees today


def test_fp8_weights_give_the_same_tokens_across_tp_layouts(models):
    """The scales shard with their rows: TP 2 prefill -> TP 4 decode equals TP 1."""
    _, fp8 = models
    one = _greedy(fp8, deployment(page_size=16, num_pages=256))
    tp2 = load_model(mesh=make_mesh(jax.devices()[:2], 2), weight_dtype=FP8)
    split = deployment(page_size=16, num_pages=256, devices=(0, 1), tp=2,
                       decode_devices=(2, 3, 4, 5), decode_tp=4)
    assert _greedy(tp2, split) == one


def test_the_config_key_is_checked():
    assert parse_config({"model": {"weight_dtype": "float8_e4m3fn"}}).model.weight_dtype == FP8
    with pytest.raises(ConfigError, match="model.weight_dtype: Input should be 'float8_e4m3fn'"):
        parse_config({"model": {"weight_dtype": "int4"}})
