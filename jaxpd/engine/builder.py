"""Assemble an Engine from a model and a mesh plan (colocated or disaggregated)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence as Seq

import jax

from jaxpd.engine.decode import DecodeEngine
from jaxpd.engine.orchestrator import Engine
from jaxpd.engine.prefill import PrefillEngine
from jaxpd.engine.runner import ModelRunner
from jaxpd.errors import ConfigError
from jaxpd.kv.layout import KVLayout
from jaxpd.kv.manager import KVCacheManager
from jaxpd.model.config import ModelConfig
from jaxpd.model.sharding import make_mesh, shard_params
from jaxpd.transfer.device import DeviceTransport


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    mode: Literal["colocated", "disaggregated"] = "colocated"
    prefill_devices: tuple[int, ...] = (0,)  # indices into jax.devices()
    prefill_tp: int = 1
    decode_devices: tuple[int, ...] = (0,)  # disaggregated only
    decode_tp: int = 1
    page_size: int = 16
    num_pages: int = 512  # per pool
    attention: str = "auto"
    chunk_size: int = 256
    max_prefill_tokens: int = 2048
    max_decode_batch: int = 64
    prefix_caching: bool = True
    seed: int = 0


def _mesh(indices: Seq[int], tp: int, what: str):
    devices = jax.devices()
    if not indices or max(indices) >= len(devices):
        raise ConfigError(f"{what} devices {list(indices)} are not all among the {len(devices)} visible")
    return make_mesh([devices[i] for i in indices], tp)


def _side(config: ModelConfig, params, mesh, tp, opts: EngineOptions):
    layout = KVLayout.for_model(config, tp=tp, page_size=opts.page_size)
    manager = KVCacheManager(layout, opts.num_pages, mesh, prefix_caching=opts.prefix_caching)
    return ModelRunner(config, shard_params(params, config, mesh), mesh, manager, opts.attention)


def build_engine(config: ModelConfig, params, opts: EngineOptions = EngineOptions()) -> Engine:
    """`params` may live anywhere; they are placed on each mesh with the TP layout."""
    prefill_mesh = _mesh(opts.prefill_devices, opts.prefill_tp, "prefill")
    prefill_runner = _side(config, params, prefill_mesh, opts.prefill_tp, opts)
    prefill = PrefillEngine(prefill_runner, chunk_size=opts.chunk_size,
                            max_batch_tokens=opts.max_prefill_tokens)
    if opts.mode == "colocated":
        decode = DecodeEngine(prefill_runner, max_batch=opts.max_decode_batch)
        return Engine(prefill, decode, seed=opts.seed)
    if opts.mode != "disaggregated":
        raise ConfigError(f"mode {opts.mode!r} is not 'colocated' or 'disaggregated'")
    if set(opts.prefill_devices) & set(opts.decode_devices):
        raise ConfigError("disaggregated prefill and decode devices must not overlap")
    decode_mesh = _mesh(opts.decode_devices, opts.decode_tp, "decode")
    decode_runner = _side(config, params, decode_mesh, opts.decode_tp, opts)
    decode = DecodeEngine(decode_runner, max_batch=opts.max_decode_batch)
    return Engine(prefill, decode, DeviceTransport(), seed=opts.seed)
