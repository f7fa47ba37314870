"""Load a Hugging Face checkpoint folder straight into sharded device arrays.

Each parameter is built with `jax.make_array_from_callback`: every device asks for its own
shard, which is read from the memory-mapped file and cast on the host. No device ever holds a
whole TP-split tensor and the host never holds the model twice (at most one shard in flight).
Decoder layers load in the form the config runs (`jaxpd.model.llama`): unrolled, one parameter
per `model.layers.<i>.…` tensor; scanned, a parameter stacked over layers, whose shard is this
rank's slice of that tensor in every layer, read layer by layer into one host buffer.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from jaxpd.errors import CheckpointError
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import LAYERS, is_stacked
from jaxpd.model.safetensors_file import SafetensorsFile
from jaxpd.model.sharding import abstract_params, make_mesh, param_shardings

INDEX_FILE = "model.safetensors.index.json"


def hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """HF tensor name of a parameter path, in either layer form:
    ('layers_0', 'mlp', 'up_proj', 'weight') and, for a stacked parameter of layer 0,
    (('layers', 'mlp', 'up_proj', 'weight'), 0) -> 'model.layers.0.mlp.up_proj.weight'."""
    if is_stacked(path):
        path = (path[0], str(layer)) + path[1:]
    elif path[0].startswith(LAYERS + "_"):
        path = (LAYERS, path[0][len(LAYERS) + 1:]) + path[1:]
    name = ".".join(path)
    return name if name.startswith("lm_head.") else "model." + name


class TensorIndex:
    """Which file holds which tensor, over a single file or an indexed set of shards."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_FILE
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("'weight_map' must map tensor names to file names")
            except KeyError:
                raise CheckpointError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
            except (ValueError, TypeError) as e:  # ValueError: bad JSON or not UTF-8
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            self._where = dict(weight_map)
            # Every shard up front: an interrupted download should name all its missing files.
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                also = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
                raise CheckpointError(f"{folder / missing[0]}: listed in {INDEX_FILE} but missing{also}")
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{folder}: no *.safetensors files (and no {INDEX_FILE})")
            for f in files:
                for name in self._open(f.name).keys():
                    self._where[name] = f.name

    def _open(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            path = self.folder / filename
            if not path.exists():
                raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
            self._files[filename] = SafetensorsFile(path)
        return self._files[filename]

    def find(self, name: str) -> tuple[SafetensorsFile, str] | None:
        """(file, stored name) for `name`, accepting checkpoints saved without the 'model.' prefix."""
        for candidate in (name, name.removeprefix("model.")):
            if candidate in self._where:
                f = self._open(self._where[candidate])
                if candidate not in f:
                    raise CheckpointError(f"{f.path}: {INDEX_FILE} says it holds {candidate!r} but it does not")
                return f, candidate
        return None


def load_hf_params(folder: str | Path, config: ModelConfig, mesh: Mesh | None = None):
    """Parameters of `config` from the safetensors in `folder`, laid out on `mesh` (TP rules)."""
    folder = Path(folder)
    mesh = mesh if mesh is not None else make_mesh(jax.devices()[:1], 1)
    abstract = abstract_params(config)
    shardings = param_shardings(abstract, config, mesh)
    index = TensorIndex(folder)
    target = np.dtype(config.jnp_dtype)

    def find(name: str, shape: tuple[int, ...]) -> tuple[SafetensorsFile, str]:
        found = index.find(name)
        if found is None:
            hint = ("; config.json has tie_word_embeddings=false, so the model needs its own output "
                    "projection" if name == "lm_head.weight" else "")
            raise CheckpointError(f"{folder}: tensor {name!r} is missing from the checkpoint{hint}")
        f, stored = found
        if f.shape(stored) != shape:
            raise CheckpointError(f"{f.path}: tensor {stored!r} has shape {list(f.shape(stored))}, "
                                  f"config.json implies {list(shape)}")
        return f, stored

    def load(path, leaf, sharding):
        keys, shape = tuple(k.key for k in path), tuple(leaf.shape)
        if not is_stacked(keys):
            f, stored = find(hf_name(keys), shape)
            return jax.make_array_from_callback(
                shape, sharding, lambda idx: f.read(stored, idx).astype(target))
        layers = [find(hf_name(keys, i), shape[1:]) for i in range(shape[0])]

        def read_layers(idx):  # idx[0] picks layers, idx[1:] this rank's slice of each
            picked = layers[idx[0]]
            first = picked[0][0].read(picked[0][1], idx[1:])
            out = np.empty((len(picked),) + first.shape, target)
            out[0] = first
            for i, (f, stored) in enumerate(picked[1:], 1):
                out[i] = f.read(stored, idx[1:])
            return out

        return jax.make_array_from_callback(shape, sharding, read_layers)

    return jax.tree_util.tree_map_with_path(load, abstract, shardings)


def is_hf_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "config.json").exists() and (
        (folder / INDEX_FILE).exists() or any(folder.glob("*.safetensors")))
