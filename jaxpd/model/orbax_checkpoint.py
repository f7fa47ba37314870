"""Save and restore parameters with orbax, onto any mesh / TP degree.

Layout of a jaxpd orbax checkpoint folder:
    model_config.json   the ModelConfig (so the folder is self-describing)
    params/             orbax PyTree checkpoint of the parameters
    tokenizer.json ...  tokenizer files copied from the source checkpoint, if any
Restoring asks orbax for arrays already carrying the target mesh's shardings, so each device reads
only its own shards: TP=2 checkpoints restore on TP=4 without a gather on one device.

Parameters are saved as they live in memory: decoder layers stacked under `layers` (the scanned
form) or one `layers_<i>` subtree per layer (the unrolled form; see `jaxpd.model.llama`). Either
restores into either: the checkpoint is read in its own form, straight into the target mesh's
shardings, and converted on device one parameter at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxpd.errors import CheckpointError, ConfigError
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import LAYERS, layer_name, layers_for
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
    """Parameters restored directly into `mesh`'s TP layout (cast to `config.dtype`), their
    decoder layers in the form `config.scan_layers` reads."""
    folder = Path(folder).absolute()
    mesh = mesh if mesh is not None else make_mesh(jax.devices()[:1], 1)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            saved = ckptr.metadata(folder / PARAMS_DIR).item_metadata
            saved_form = config
            if LAYERS in saved or layer_name(0) in saved:
                saved_form = config.replace(scan_layers=LAYERS in saved)
            abstract = abstract_params(saved_form)
            shardings = param_shardings(abstract, saved_form, mesh)
            target = jax.tree_util.tree_map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, config.jnp_dtype, sharding=s),
                abstract, shardings)
            params = ckptr.restore(folder / PARAMS_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{folder / PARAMS_DIR}: cannot restore ({str(e).splitlines()[0]})") from None
    return layers_for(params, config, consume=True)
