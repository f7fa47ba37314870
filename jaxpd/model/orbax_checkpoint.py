"""Save and restore parameters with orbax, onto any mesh / TP degree.

Layout of a jaxpd orbax checkpoint folder:
    model_config.json   the ModelConfig (so the folder is self-describing)
    params/             orbax PyTree checkpoint of the parameters
    tokenizer.json ...  tokenizer files copied from the source checkpoint, if any
Restoring asks orbax for arrays already carrying the target mesh's shardings, so each device reads
only its own shards: TP=2 checkpoints restore on TP=4 without a gather on one device.

Parameters are saved as they live in memory, decoder layers stacked under `layers`. Checkpoints
written before the layers were stacked (one `layers_<i>` subtree per layer) still restore: each
layer is read into its sharded layout and the layers are stacked on device, which briefly holds
the layer parameters twice (sharded, never on one device). Re-save to drop that cost.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpd.errors import CheckpointError, ConfigError
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import LAYERS
from jaxpd.model.sharding import abstract_params, make_mesh, param_shardings

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def is_orbax_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_FILE).exists() and (folder / PARAMS_DIR).is_dir()


def save_orbax(folder: str | Path, params, config: ModelConfig,
               tokenizer_from: str | Path | None = None) -> Path:
    """Write `params` (sharded or not) and `config`; refuses to overwrite an existing checkpoint."""
    folder = Path(folder).absolute()
    if (folder / PARAMS_DIR).exists():
        raise CheckpointError(f"{folder}: already holds a checkpoint; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(folder / PARAMS_DIR, params)
        ckptr.wait_until_finished()
    (folder / CONFIG_FILE).write_text(config.to_json() + "\n")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.exists():
                shutil.copy(src, folder / name)
    return folder


def load_orbax_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (not a jaxpd orbax checkpoint)") from None
    except (json.JSONDecodeError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: invalid model config ({e})") from None


def restore_orbax(folder: str | Path, config: ModelConfig, mesh: Mesh | None = None):
    """Parameters restored directly into `mesh`'s TP layout (cast to `config.dtype`)."""
    folder = Path(folder).absolute()
    mesh = mesh if mesh is not None else make_mesh(jax.devices()[:1], 1)
    abstract = abstract_params(config)
    shardings = param_shardings(abstract, config, mesh)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, config.jnp_dtype, sharding=s), abstract, shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            saved = ckptr.metadata(folder / PARAMS_DIR).item_metadata
            if LAYERS in saved or f"{LAYERS}_0" not in saved:
                return ckptr.restore(folder / PARAMS_DIR, target)
            per_layer = ckptr.restore(folder / PARAMS_DIR, _per_layer(target, config.num_layers))
            return _stack_layers(per_layer, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{folder / PARAMS_DIR}: cannot restore ({str(e).splitlines()[0]})") from None


def _per_layer(target: dict, num_layers: int) -> dict:
    """The restore target of a pre-stacking checkpoint: `layers_<i>` subtrees, each leaf one
    layer of the stacked target (same sharding without the layer axis)."""
    def one_layer(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        sharding = NamedSharding(leaf.sharding.mesh, P(*leaf.sharding.spec[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)

    layer = jax.tree.map(one_layer, target[LAYERS])
    rest = {k: v for k, v in target.items() if k != LAYERS}
    return rest | {f"{LAYERS}_{i}": layer for i in range(num_layers)}


def _stack_layers(per_layer: dict, target: dict) -> dict:
    """`layers_<i>` subtrees -> one stacked `layers` subtree, in the target's shardings."""
    num_layers = jax.tree.leaves(target[LAYERS])[0].shape[0]
    layers = [per_layer.pop(f"{LAYERS}_{i}") for i in range(num_layers)]
    shardings = jax.tree.map(lambda leaf: leaf.sharding, target[LAYERS])
    stack = jax.jit(lambda ls: jax.tree.map(lambda *xs: jnp.stack(xs), *ls), out_shardings=shardings)
    return per_layer | {LAYERS: stack(layers)}
