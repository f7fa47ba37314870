"""Orbax save/restore across TP degrees, and the `jaxpd convert` path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import HF_FIXTURES, expected
from jaxpd.errors import CheckpointError
from jaxpd.model import forward
from jaxpd.model.checkpoint import load_model
from jaxpd.model.orbax_checkpoint import is_orbax_checkpoint, save_orbax
from jaxpd.model.llama import stack_layers, unstack_layers
from jaxpd.model.sharding import make_mesh


def _logits(model, mesh, prompt):
    out = forward.prefill(model.params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]),
                          config=model.config, mesh=mesh)
    return np.asarray(out.logits[0])


def test_save_on_tp2_restore_on_tp4_same_logits(tmp_path, devices):
    prompt = expected("llama")["prompts"][2]
    mesh2, mesh4 = make_mesh(devices[:2], 2), make_mesh(devices[4:8], 4)
    source = load_model(HF_FIXTURES / "llama", mesh2)
    save_orbax(tmp_path / "ckpt", source.params, source.config, tokenizer_from=source.folder)
    assert is_orbax_checkpoint(tmp_path / "ckpt")

    restored = load_model(tmp_path / "ckpt", mesh4)
    assert restored.config == source.config
    q = restored.params["layers_1"]["self_attn"]["q_proj"]["weight"]
    assert q.sharding.mesh.devices.tolist() == [devices[4:8]]
    assert {s.data.shape[0] for s in q.addressable_shards} == {q.shape[0] // 4}
    for a, b in zip(jax.tree_util.tree_leaves(restored.params), jax.tree_util.tree_leaves(source.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # weights restored bit for bit
    # Logits agree up to the reduction order that a different TP degree implies.
    np.testing.assert_allclose(_logits(restored, mesh4, prompt), _logits(source, mesh2, prompt), atol=1e-5)
    np.testing.assert_allclose(_logits(restored, mesh4, prompt),
                               expected("llama")["last_logits"][2], atol=1e-4)


def test_save_refuses_to_overwrite(tmp_path, devices):
    model = load_model(HF_FIXTURES / "qwen2")
    save_orbax(tmp_path / "ckpt", model.params, model.config)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        save_orbax(tmp_path / "ckpt", model.params, model.config)


def test_restore_with_a_mismatched_config_is_a_clear_error(tmp_path):
    model = load_model(HF_FIXTURES / "qwen2")
    save_orbax(tmp_path / "ckpt", model.params, model.config)
    cfg_file = tmp_path / "ckpt" / "model_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"intermediate_size": 128', '"intermediate_size": 96'))
    with pytest.raises(CheckpointError, match="cannot restore"):
        load_model(tmp_path / "ckpt")
    cfg_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="model_config.json: invalid model config"):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_either_layer_form_restores_into_either(tmp_path, devices, saved_scanned):
    """Unrolled checkpoints (one `layers_<i>` subtree per layer, also every checkpoint written
    before scanning existed) and scanned ones (stacked `layers`) restore into both forms, in
    the target mesh's shardings, bit for bit."""
    model = load_model(HF_FIXTURES / "qwen2")
    saved = stack_layers(model.params) if saved_scanned else model.params
    save_orbax(tmp_path / "ckpt", saved, model.config)
    mesh = make_mesh(devices[:2], 2)
    scanned = load_model(tmp_path / "ckpt", mesh, scan_layers=True).params
    unrolled = load_model(tmp_path / "ckpt", mesh, scan_layers=False).params
    assert "layers_0" not in scanned and "layers" not in unrolled
    P = jax.sharding.PartitionSpec
    assert scanned["layers"]["self_attn"]["q_proj"]["weight"].sharding.spec == P(None, "tp", None)
    last = unrolled[f"layers_{model.config.num_layers - 1}"]["self_attn"]["o_proj"]["weight"]
    assert last.sharding.spec == P(None, "tp") and last.sharding.mesh == mesh
    for got in (unrolled, unstack_layers(scanned)):
        assert jax.tree.structure(got) == jax.tree.structure(model.params)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(model.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
