"""Tensor parallelism: TP 1/2/4/8 give the same logits; layouts and refusals are explicit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpd.errors import ShardingError
from jaxpd.model import forward
from jaxpd.model.llama import stack_layers
from jaxpd.model.presets import get_preset
from jaxpd.model.sharding import check_tp, make_mesh, partition_spec, shard_params

TINY = get_preset("tiny")  # 8 query heads, 2 KV heads
TOKENS = jnp.array([[5, 9, 11, 40, 7, 3], [17, 8, 99, 0, 0, 0]], jnp.int32)
LENGTHS = jnp.array([6, 3])


@pytest.fixture(scope="module")
def params():
    return forward.init_params(TINY, jax.random.key(1))


@pytest.fixture(scope="module")
def reference(params):
    return forward.prefill(params, TOKENS, LENGTHS, config=TINY, all_logits=True)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_degrees_agree(params, reference, devices, tp):
    mesh = make_mesh(devices[:tp], tp)
    sharded = shard_params(params, TINY, mesh)
    out = forward.prefill(sharded, TOKENS, LENGTHS, config=TINY, mesh=mesh, all_logits=True)
    np.testing.assert_allclose(out.logits, reference.logits, atol=1e-5)
    # KV heads: 2 real heads, replicated to one per rank when TP exceeds them.
    heads = max(TINY.num_kv_heads, tp)
    assert out.kv.k.shape == (TINY.num_layers, 2, 6, heads, TINY.head_dim)
    assert tp == 1 or out.kv.k.sharding.spec[3] == "tp"
    shard_heads = {s.data.shape[3] for s in out.kv.k.addressable_shards}
    assert shard_heads == {heads // tp}
    if tp > TINY.num_kv_heads:  # each rank's copy is the KV head its query heads read
        repeat = tp // TINY.num_kv_heads
        np.testing.assert_allclose(out.kv.k[:, :, :, ::repeat], reference.kv.k, atol=1e-5)


def test_dp_and_tp_together(params, reference, devices):
    mesh = make_mesh(devices, 4)  # dp=2 x tp=4
    assert dict(mesh.shape) == {"dp": 2, "tp": 4}
    out = forward.prefill(shard_params(params, TINY, mesh), TOKENS, LENGTHS, config=TINY,
                          mesh=mesh, all_logits=True)
    np.testing.assert_allclose(out.logits, reference.logits, atol=1e-5)


def test_weights_are_split_megatron_style(params, devices):
    mesh = make_mesh(devices[:2], 2)
    layer = shard_params(params, TINY, mesh)["layers_1"]  # unrolled: one subtree per layer
    assert layer["self_attn"]["q_proj"]["weight"].sharding.spec == P("tp", None)
    assert layer["self_attn"]["o_proj"]["weight"].sharding.spec == P(None, "tp")
    assert layer["mlp"]["gate_proj"]["weight"].sharding.spec == P("tp", None)
    assert layer["mlp"]["down_proj"]["weight"].sharding.spec == P(None, "tp")
    assert {s.data.shape for s in layer["self_attn"]["q_proj"]["weight"].addressable_shards} == {(32, 64)}
    scanned = TINY.replace(scan_layers=True)
    layers = shard_params(stack_layers(params), scanned, mesh)["layers"]  # the layer axis is never split
    assert layers["self_attn"]["q_proj"]["weight"].sharding.spec == P(None, "tp", None)
    assert layers["self_attn"]["o_proj"]["weight"].sharding.spec == P(None, None, "tp")
    assert layers["mlp"]["gate_proj"]["weight"].sharding.spec == P(None, "tp", None)
    assert layers["mlp"]["down_proj"]["weight"].sharding.spec == P(None, None, "tp")
    q = layers["self_attn"]["q_proj"]["weight"]
    assert {s.data.shape for s in q.addressable_shards} == {(TINY.num_layers, 32, 64)}


def test_kv_projection_replicated_when_tp_exceeds_kv_heads():
    k_proj = ("layers", "self_attn", "k_proj", "weight")
    assert partition_spec(k_proj, (2, 16, 64), TINY, 8) == P(None)
    assert partition_spec(k_proj, (2, 16, 64), TINY, 2) == P(None, "tp", None)


def test_uneven_dimensions_fall_back_to_replication():
    odd = TINY.replace(vocab_size=501, intermediate_size=100)
    assert partition_spec(("embed_tokens", "weight"), (501, 64), odd, 8) == P(None, "tp")
    assert partition_spec(("layers", "mlp", "up_proj", "weight"), (2, 100, 64), odd, 8) == P(None)


def test_refusals_say_what_to_change(devices):
    with pytest.raises(ShardingError, match=r"tp=3 must divide num_heads=8; use a TP degree among \[1, 2, 4, 8\]"):
        check_tp(TINY, 3)
    with pytest.raises(ShardingError, match="num_kv_heads=3"):
        check_tp(TINY.replace(num_heads=12, num_kv_heads=3), 4)
    with pytest.raises(ShardingError, match="tp=3 must be >= 1 and divide the number of devices"):
        make_mesh(devices, 3)
