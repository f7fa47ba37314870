"""The scanned layer stack: same tokens as the unrolled one, and one compiled layer body."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import HF_FIXTURES, deployment, first_programs_only
from jaxpd.engine import model_step
from jaxpd.engine.attention import paged_attention_jnp
from jaxpd.engine.builder import build_engine
from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.kv.pool import KVPages
from jaxpd.model import forward
from jaxpd.model.checkpoint import load_model
from jaxpd.model.llama import stack_layers, unstack_layers
from jaxpd.model.presets import get_preset
from jaxpd.model.sharding import abstract_params

SMALL = dict(page_size=4, num_pages=64, chunk_size=16, max_prefill_tokens=32)
MODES = {"colocated": dict(devices=(0, 1), tp=2),
         "disaggregated": dict(devices=(0, 1, 2, 3), tp=4, decode_devices=(4, 5), decode_tp=2)}


def _greedy(model, config, mode, prompts):
    engine = first_programs_only(build_engine(config, model.params,
                                              deployment(**SMALL, **MODES[mode])))
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"r{i}", p, SamplingParams(max_tokens=6, ignore_eos=True)))
    final = {}
    while engine.has_unfinished():
        final.update((out.id, list(out.token_ids)) for out in engine.step() if out.finished)
    return [final[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint, mode", [("embedded", "colocated"), ("llama", "disaggregated")])
def test_scanned_and_unrolled_engines_draw_the_same_tokens(checkpoint, mode):
    model = load_model(None if checkpoint == "embedded" else HF_FIXTURES / checkpoint)
    assert not model.config.scan_layers  # the default
    rng = np.random.default_rng(3)
    vocab = min(model.config.vocab_size, 320)
    prompts = [tuple(int(t) for t in rng.integers(3, vocab, n)) for n in (5, 17, 30)]
    unrolled = _greedy(model, model.config, mode, prompts)
    # the engine converts the unrolled parameters to the stacked form the scan reads
    scanned = _greedy(model, model.config.replace(scan_layers=True), mode, prompts)
    assert scanned == unrolled


@pytest.mark.slow
def test_scanned_and_unrolled_prefill_agree():
    cfg = get_preset("tiny").replace(scan_layers=True)
    params = forward.init_params(cfg, jax.random.key(2))
    assert "layers" in params and "layers_0" not in params
    tokens, lengths = jnp.array([[5, 9, 11, 40, 7], [17, 8, 99, 0, 0]]), jnp.array([5, 3])
    scanned = forward.prefill(params, tokens, lengths, config=cfg, all_logits=True)
    unrolled = forward.prefill(unstack_layers(params), tokens, lengths,
                               config=cfg.replace(scan_layers=False), all_logits=True)
    np.testing.assert_allclose(scanned.logits, unrolled.logits, atol=1e-5)
    np.testing.assert_allclose(scanned.kv.k, unrolled.kv.k, atol=1e-6)


def _compiled_step(num_layers: int, scan: bool, num_pages: int = 8):
    """The paged step compiled for a tiny random config of this depth and pool size."""
    cfg = get_preset("tiny").replace(num_layers=num_layers, scan_layers=scan, vocab_size=64,
                                     hidden_size=32, intermediate_size=32, head_dim=8)
    pool = jax.ShapeDtypeStruct((num_layers, cfg.num_kv_heads, num_pages, 4, cfg.head_dim),
                                jnp.float32)
    ints = jax.ShapeDtypeStruct((2, 3), jnp.int32)
    lowered = model_step.step_logits.lower(
        abstract_params(cfg), KVPages(pool, pool), ints, ints, jax.ShapeDtypeStruct((2, 2), jnp.int32),
        config=cfg, mesh=None, attention=paged_attention_jnp)
    return lowered.compile()


def _compiled_size(num_layers: int, scan: bool) -> int:
    return len(_compiled_step(num_layers, scan).as_text())


@pytest.mark.slow
def test_compiled_program_does_not_grow_with_depth():
    scanned = _compiled_size(8, True) / _compiled_size(2, True)
    unrolled = _compiled_size(8, False) / _compiled_size(2, False)
    assert scanned < 1.5, scanned
    assert unrolled > 2, unrolled  # what the scan saves: unrolled programs grow with depth


def test_deployment_switch_reaches_the_model_config():
    from jaxpd.config import parse_config

    assert not parse_config({}, "default").model.scan_layers
    on = parse_config({"model": {"scan_layers": True}}, "scanned")
    model = load_model(None, None, on.model.dtype, on.model.scan_layers)
    assert model.config.scan_layers and "layers" in model.params


def test_layer_forms_round_trip_on_device(devices):
    """stack_layers / unstack_layers keep every value and each leaf's TP sharding."""
    from jaxpd.model.sharding import make_mesh, shard_params

    cfg = get_preset("tiny")
    mesh = make_mesh(devices[:2], 2)
    unrolled = shard_params(forward.init_params(cfg, jax.random.key(4)), cfg, mesh)
    stacked = stack_layers(unrolled)
    assert stacked["layers"]["mlp"]["down_proj"]["weight"].sharding.spec == \
        jax.sharding.PartitionSpec(None, None, "tp")
    back = unstack_layers(stacked, consume=True)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(stacked["layers"]))
    for a, b in zip(jax.tree_util.tree_leaves_with_path(back), jax.tree_util.tree_leaves_with_path(unrolled)):
        assert a[0] == b[0] and a[1].sharding == b[1].sharding
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_carried_pool_is_updated_in_place():
    """The scan carries the donated pool: it is aliased to the output and no scratch copy of it
    (or of one layer of it) exists, so scratch memory does not grow with the pool."""
    small, big = (_compiled_step(4, True, pages).memory_analysis() for pages in (64, 512))
    assert big.alias_size_in_bytes == 8 * small.alias_size_in_bytes  # K and V, donated
    assert big.temp_size_in_bytes == small.temp_size_in_bytes
