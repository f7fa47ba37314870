"""Assemble an Engine from a model and a deployment config (colocated or disaggregated).

An in-process engine uses replica 0 of each role's first group: its `replica_devices(0)` with
its `tp` (and its own `num_pages` and `max_decode_batch` when it sets them). Further replicas
and groups are for `jaxpd serve`, which starts one engine per replica.
"""

from __future__ import annotations

import jax

from jaxpd.config import DeploymentConfig, MeshSection
from jaxpd.engine.decode import DecodeEngine
from jaxpd.engine.orchestrator import Engine
from jaxpd.engine.prefill import PrefillEngine
from jaxpd.engine.runner import ModelRunner
from jaxpd.errors import ConfigError
from jaxpd.kv.dtypes import kv_dtype_name
from jaxpd.kv.layout import KVLayout
from jaxpd.kv.manager import KVCacheManager
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import layers_for
from jaxpd.model.sharding import make_mesh, shard_params
from jaxpd.transfer.device import DeviceTransport


def _mesh(group: MeshSection, what: str):
    if group.hosts > 1:
        raise ConfigError(f"{what}.hosts: {group.hosts}: an in-process engine runs on one host; "
                          f"a group spanning several hosts cannot run here")
    indices, devices = group.replica_devices(0), jax.devices()
    if not indices or max(indices) >= len(devices):
        raise ConfigError(f"{what} devices {indices} are not all among the {len(devices)} visible "
                          f"({devices[0].platform}); on CPU set XLA_FLAGS="
                          f"--xla_force_host_platform_device_count=N")
    return make_mesh([devices[i] for i in indices], group.tp)


def _runner(config: ModelConfig, params, group: MeshSection, what: str,
            deployment: DeploymentConfig) -> ModelRunner:
    """One mesh with its own page pool and its own copy of the weights."""
    mesh = _mesh(group, what)
    layout = KVLayout.for_model(config, tp=group.tp, page_size=deployment.kv.page_size,
                                dtype=kv_dtype_name(deployment.kv.dtype, config.dtype))
    manager = KVCacheManager(layout, group.num_pages or deployment.kv.num_pages, mesh,
                             prefix_caching=deployment.scheduler.prefix_caching)
    params = shard_params(layers_for(params, config), config, mesh)
    return ModelRunner(config, params, mesh, manager, deployment.attention)


def _decode_group(deployment: DeploymentConfig) -> MeshSection:
    """The decode group, re-checked: `model_copy(update=...)` skips the config's validators."""
    if not deployment.decode:
        raise ConfigError("mode 'disaggregated' needs a 'decode' mesh")
    decode = deployment.decode[0]
    shared = set(deployment.prefill[0].replica_devices(0)) & set(decode.replica_devices(0))
    if shared:
        raise ConfigError(f"prefill and decode meshes share devices {sorted(shared)}")
    return decode


def build_engine(config: ModelConfig, params,
                 deployment: DeploymentConfig = DeploymentConfig()) -> Engine:
    """`params` may live anywhere, in either layer form; they are placed on each mesh with the
    TP layout, in the form `config.scan_layers` reads."""
    sched = deployment.scheduler
    prefill_group = deployment.prefill[0]
    prefill_runner = _runner(config, params, prefill_group, "prefill", deployment)
    prefill = PrefillEngine(prefill_runner, chunk_size=sched.chunk_size,
                            max_batch_tokens=sched.max_prefill_tokens,
                            batch_sizes=sched.prefill_batch_sizes,
                            chunk_sizes=sched.prefill_chunk_sizes)
    if deployment.mode == "colocated":
        decode = DecodeEngine(prefill_runner,
                              max_batch=prefill_group.max_decode_batch or sched.max_decode_batch,
                              steps_per_dispatch=sched.decode_steps_per_dispatch,
                              overlap=sched.overlap, batch_sizes=sched.decode_batch_sizes)
        return Engine(prefill, decode, seed=deployment.seed)
    if deployment.mode != "disaggregated":
        raise ConfigError(f"mode {deployment.mode!r} is not 'colocated' or 'disaggregated'")
    decode_group = _decode_group(deployment)
    decode_runner = _runner(config, params, decode_group, "decode", deployment)
    decode = DecodeEngine(decode_runner,
                          max_batch=decode_group.max_decode_batch or sched.max_decode_batch,
                          steps_per_dispatch=sched.decode_steps_per_dispatch,
                          overlap=sched.overlap, batch_sizes=sched.decode_batch_sizes)
    return Engine(prefill, decode, DeviceTransport(), seed=deployment.seed)
