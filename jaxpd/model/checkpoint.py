"""One entry point for every checkpoint kind: an HF folder, a jaxpd orbax folder, the embedded default."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import NamedTuple

import jax
from jax.sharding import Mesh

from jaxpd.errors import CheckpointError
from jaxpd.model.config import ModelConfig
from jaxpd.model.hf_checkpoint import is_hf_checkpoint, load_hf_params
from jaxpd.model.hf_config import load_hf_config
from jaxpd.model.orbax_checkpoint import is_orbax_checkpoint, load_orbax_config, restore_orbax
from jaxpd.model.sharding import check_tp, tp_size


class LoadedModel(NamedTuple):
    config: ModelConfig
    params: dict
    folder: Path  # where tokenizer files live


def default_checkpoint() -> Path:
    """The embedded default model shipped inside the package (see tools/train_tiny.py)."""
    return Path(str(resources.files("jaxpd") / "assets" / "default_model"))


def load_config(folder: str | Path | None) -> ModelConfig:
    folder = Path(folder) if folder is not None else default_checkpoint()
    if is_orbax_checkpoint(folder):
        return load_orbax_config(folder)
    if is_hf_checkpoint(folder):
        return load_hf_config(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file; pass the checkpoint folder that holds it")
    if (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: has config.json but no *.safetensors weights")
    if any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: has *.safetensors but no config.json")
    raise CheckpointError(
        f"{folder}: not a checkpoint (expected config.json with *.safetensors, or a jaxpd orbax "
        f"checkpoint with model_config.json and params/)")


def load_model(folder: str | Path | None = None, mesh: Mesh | None = None,
               dtype: str | None = None, scan_layers: bool = False,
               weight_dtype: str | None = None) -> LoadedModel:
    """Config and sharded parameters from `folder` (default: the embedded model).

    `dtype` overrides the checkpoint's dtype; by default CPU runs in float32, since XLA on CPU
    emulates bfloat16 arithmetic slowly. `scan_layers=True` scans one compiled layer over stacked
    weights (see `jaxpd.model.llama`); the parameters come in the form it reads.
    `weight_dtype="float8_e4m3fn"` stores the layers' linear weights in FP8 with a scale per
    row (`jaxpd.model.quantize`), quantized here as they load.
    """
    folder = Path(folder) if folder is not None else default_checkpoint()
    config = load_config(folder).replace(scan_layers=scan_layers)
    if dtype is None and jax.default_backend() == "cpu":
        dtype = "float32"
    if dtype is not None:
        config = config.replace(dtype=dtype)
    check_tp(config, tp_size(mesh))
    if is_orbax_checkpoint(folder):
        params = restore_orbax(folder, config, mesh)
    else:
        params = load_hf_params(folder, config, mesh)
    if weight_dtype is not None:
        from jaxpd.model.quantize import quantize_params
        from jaxpd.model.sharding import shard_params

        config = config.replace(weight_dtype=weight_dtype)
        params = quantize_params(params, weight_dtype)
        if mesh is not None:  # the scales take their rows' layout (model/sharding.py)
            params = shard_params(params, config, mesh)
    return LoadedModel(config, params, folder)
