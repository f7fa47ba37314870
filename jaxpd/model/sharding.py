"""Tensor-parallel layout: meshes, partition rules, and placing parameters on them.

Megatron-style: QKV, gate and up projections are column-parallel (output rows split on `tp`),
o and down projections row-parallel (input columns split), so each layer needs one all-reduce
after attention and one after the MLP. Attention heads and KV heads split on `tp`; with fewer
KV heads than TP ranks the K/V projections are replicated and each rank keeps a copy of the KV
head its query heads read (as vLLM does). A `dp` axis holds replicas / the batch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpd.errors import ShardingError
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import is_stacked, kv_head_repeat

AXES = ("dp", "tp")


def make_mesh(devices: Sequence[jax.Device] | None = None, tp: int = 1) -> Mesh:
    """A ('dp', 'tp') mesh over `devices` (default: all), TP groups of consecutive devices."""
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1 or len(devices) % tp:
        raise ShardingError(f"tp={tp} must be >= 1 and divide the number of devices ({len(devices)})")
    return Mesh(np.asarray(devices, dtype=object).reshape(len(devices) // tp, tp), AXES)


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["tp"]


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raise a ShardingError that says what to change when `config` cannot run at this TP."""
    if config.num_heads % tp:
        raise ShardingError(
            f"tp={tp} must divide num_heads={config.num_heads}; "
            f"use a TP degree among {[d for d in range(1, config.num_heads + 1) if config.num_heads % d == 0]}")
    kv = config.num_kv_heads
    if kv % tp and tp % kv:
        raise ShardingError(
            f"tp={tp} and num_kv_heads={kv}: one must divide the other (KV heads are split across "
            f"ranks, or replicated when there are fewer KV heads than ranks)")


def _split_rows_if(divisible: bool) -> P:
    return P("tp", None) if divisible else P()


def partition_spec(path: tuple[str, ...], shape: tuple[int, ...], config: ModelConfig,
                   tp: int) -> P:
    """PartitionSpec of the parameter at `path` (e.g. ('layers', 'self_attn', 'q_proj', 'weight')).

    Decoder-layer parameters are stacked on a leading layer axis, which is never split: each
    rank holds its slice of every layer, as a scanned layer stack reads them."""
    if is_stacked(path):
        return P(None, *_layer_spec(path, shape[1:], config, tp))
    return _layer_spec(path, shape, config, tp)


def _layer_spec(path: tuple[str, ...], shape: tuple[int, ...], config: ModelConfig,
                tp: int) -> P:
    """PartitionSpec of one layer's (or a top-level) parameter of `shape`."""
    module, leaf = path[-2], path[-1]
    kv_split = kv_head_repeat(config, tp) == 1
    inter_split = config.intermediate_size % tp == 0
    if module in ("embed_tokens", "lm_head"):
        vocab, hidden = shape
        if vocab % tp == 0:
            return P("tp", None)
        return P(None, "tp") if hidden % tp == 0 else P()
    if module == "q_proj":
        return P("tp", None) if leaf == "weight" else P("tp")
    if module in ("k_proj", "v_proj"):
        if not kv_split:
            return P()
        return P("tp", None) if leaf == "weight" else P("tp")
    if module in ("gate_proj", "up_proj"):
        if not inter_split:
            return P()
        return P("tp", None) if leaf == "weight" else P("tp")
    if module == "o_proj":
        return P(None, "tp") if leaf == "weight" else P()
    if module == "down_proj":
        return P(None, "tp") if (leaf == "weight" and inter_split) else P()
    return P()  # norms


def param_shardings(abstract_params, config: ModelConfig, mesh: Mesh):
    """A pytree of NamedSharding matching `abstract_params` (arrays or ShapeDtypeStructs)."""
    tp = tp_size(mesh)
    check_tp(config, tp)

    def spec(path, leaf):
        keys = tuple(k.key for k in path)
        return NamedSharding(mesh, partition_spec(keys, tuple(leaf.shape), config, tp))

    return jax.tree_util.tree_map_with_path(spec, abstract_params)


def shard_params(params, config: ModelConfig, mesh: Mesh):
    """Place (or re-place) parameters on `mesh` with the TP layout."""
    return jax.device_put(params, param_shardings(params, config, mesh))


def abstract_params(config: ModelConfig):
    """ShapeDtypeStructs of every parameter, without allocating any."""
    from jaxpd.model.forward import init_params

    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
