"""One role's process: a prefill, decode or colocated worker, or the router.

`jaxpd serve ROLE --config FILE --replica I` lands here (the launcher starts every role this
way). The caller has already made the replica's own devices the only visible ones, so a worker's
mesh is always its local devices 0..tp-1. A process prints one `JAXPD_READY {json}` line once it
serves, and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from jaxpd.config import DeploymentConfig, MeshSection
from jaxpd.errors import ConfigError, JaxpdError

log = logging.getLogger("jaxpd.serve")

ROLES = ("router", "prefill", "decode", "colocated")
READY_PREFIX = "JAXPD_READY "


def worker_group(deployment: DeploymentConfig, role: str) -> tuple[MeshSection, str]:
    """(the worker group a role's replicas belong to, its config key)."""
    if role == "decode":
        if deployment.mode != "disaggregated":
            raise ConfigError("role 'decode' needs mode: disaggregated (colocated deployments run "
                              "'colocated' workers)")
        return deployment.decode, "decode"
    if role == "prefill" and deployment.mode != "disaggregated":
        raise ConfigError("role 'prefill' needs mode: disaggregated (colocated deployments run "
                          "'colocated' workers)")
    if role == "colocated" and deployment.mode != "colocated":
        raise ConfigError("role 'colocated' needs mode: colocated")
    return deployment.prefill, "prefill"


def announce(role: str, replica: int, address: str) -> None:
    print(READY_PREFIX + json.dumps({"role": role, "replica": replica, "address": address}),
          flush=True)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# -- workers ---------------------------------------------------------------------------------------
def _load_worker(deployment: DeploymentConfig, tp: int):
    """(engine, model config, wire context) on this process's devices, compiled and warm."""
    import jax

    from jaxpd.engine.builder import build_engine
    from jaxpd.model.checkpoint import load_model
    from jaxpd.model.sharding import make_mesh
    from jaxpd.serving.worker_common import local_deployment
    from jaxpd.tokenizer import merge_tokenizer_eos, tokenizer_for_checkpoint
    from jaxpd.transfer.wire import WireContext, model_fingerprint

    devices = jax.devices()
    if len(devices) < tp:
        raise JaxpdError(f"this worker needs tp={tp} devices but sees {len(devices)} "
                         f"({devices[0].platform})")
    mesh = make_mesh(devices[:tp], tp)
    model = load_model(deployment.model.checkpoint, mesh, deployment.model.dtype,
                       deployment.model.scan_layers)
    config = merge_tokenizer_eos(model.config, tokenizer_for_checkpoint(model.folder))
    engine = build_engine(config, model.params, local_deployment(deployment, tp))
    wire = WireContext(model_fingerprint(config, model.params), engine.prefill.manager.layout,
                       deployment.serving.kv_message_bytes)
    return engine, config, wire


def _warm_up(role: str, scheduler) -> str:
    """Before the port opens: compile every step shape this role runs (prefill buckets on a
    prefill worker, decode buckets on a decode worker, both on a colocated one), or with JAXPD_PRECOMPILE=off only the
    first prefill and decode shapes. Returns what was done, for the log."""
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams
    from jaxpd.serving.serve_cli import PRECOMPILE_ENV

    if os.environ.get(PRECOMPILE_ENV, "").lower() not in ("off", "0", "false", "no"):
        if role == "colocated":
            return f"all {scheduler.engine.precompile()} step shapes compiled"
        stage = scheduler.prefill if role == "prefill" else scheduler.engine.decode
        return f"all {stage.precompile()} step shapes compiled"
    warm = Request("__warmup__", (1, 2, 3), SamplingParams(max_tokens=2, ignore_eos=True))
    if role == "prefill":
        scheduler.add(warm, 0, lambda ev: None)
        while scheduler.has_work():
            scheduler.step()
        scheduler.release(warm.id)
    else:
        scheduler.engine.run_to_completion([warm])
    return "first prefill and decode shapes compiled"


async def _serve_worker(role: str, replica: int, deployment: DeploymentConfig, where: str) -> None:
    from jaxpd.serving.decode_worker import DecodeScheduler, DecodeServicer, kv_transfer_handler
    from jaxpd.serving.engine_thread import EngineThread
    from jaxpd.serving.grpc_server import start_server
    from jaxpd.serving.prefill_worker import PrefillScheduler, PrefillServicer
    from jaxpd.serving.worker_common import WorkerState
    from jaxpd.v1 import worker_pb2_grpc

    group, key = worker_group(deployment, role)
    loop = asyncio.get_running_loop()
    engine, config, wire = await loop.run_in_executor(None, _load_worker, deployment, group.tp)
    state = WorkerState(role, replica, deployment, engine, config, wire)
    digests = deployment.serving.record_kv_digests
    if role == "prefill":
        scheduler = PrefillScheduler(engine.prefill, record_digests=digests)
    else:
        scheduler = DecodeScheduler(engine, wire, record_digests=digests)
    started = time.perf_counter()
    done = await loop.run_in_executor(None, _warm_up, role, scheduler)
    log.info("%s-%d: %s in %.1f s (compilation cache: %s)", role, replica, done,
             time.perf_counter() - started, os.environ.get("JAXPD_CACHE_DIR", "off"))
    thread = EngineThread(f"engine-{role}-{replica}", scheduler.has_work, scheduler.step,
                          scheduler.fail_all, loop)

    def register(server) -> None:
        if role == "prefill":
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server(
                PrefillServicer(state, scheduler, thread), server)
        else:
            servicer = DecodeServicer(state, scheduler, thread)
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
            server.add_generic_rpc_handlers((kv_transfer_handler(servicer),))

    services = (["jaxpd.v1.PrefillWorker"] if role == "prefill"
                else ["jaxpd.v1.DecodeWorker", "jaxpd.v1.KVTransfer"])
    port = group.port + replica if group.port else 0
    server = await start_server(group.host, port, key=f"{key}.port", where=where,
                                services=services, register=register)
    state.address = server.address
    thread.start()
    await server.set_serving()
    log.info("%s-%d serving on %s (tp=%d)", role, replica, server.address, group.tp)
    announce(role, replica, server.address)
    try:
        await _until_signalled()
    finally:
        await server.stop()
        thread.stop()


# -- the router -------------------------------------------------------------------------------------
def _addresses(group: MeshSection | None, key: str, given: list[str] | None) -> list[str]:
    if given is not None:
        return given
    if group is None:
        return []
    if not group.port:
        raise ConfigError(f"{key}.port: set the workers' port so the router can find them (port 0 "
                          f"only works when `jaxpd serve --config` starts every process)")
    return [group.address(i) for i in range(group.replicas)]


async def _serve_router(deployment: DeploymentConfig, where: str, prefill: list[str] | None,
                        decode: list[str] | None) -> None:
    from jaxpd.model.checkpoint import default_checkpoint, load_config
    from jaxpd.serving.grpc_server import start_server
    from jaxpd.serving.router import RequestFailed, Router, make_workers
    from jaxpd.tokenizer import merge_tokenizer_eos, tokenizer_for_checkpoint
    from jaxpd.v1 import generation_pb2_grpc

    folder = Path(deployment.model.checkpoint) if deployment.model.checkpoint else default_checkpoint()
    tokenizer = tokenizer_for_checkpoint(folder)
    config = merge_tokenizer_eos(load_config(folder), tokenizer)
    if deployment.mode == "disaggregated":
        prefill_addrs = _addresses(deployment.prefill, "prefill", prefill)
        decode_addrs = _addresses(deployment.decode, "decode", decode)
    else:
        prefill_addrs, decode_addrs = [], _addresses(deployment.prefill, "prefill", decode)
    router = Router(deployment, config, tokenizer, deployment.model.checkpoint or "default",
                    prefill=make_workers("prefill", prefill_addrs),
                    decode=make_workers("decode" if prefill_addrs else "colocated", decode_addrs))
    try:
        await router.connect(deployment.serving.startup_timeout_s)
    except RequestFailed as e:
        raise JaxpdError(f"router: {e}") from None
    r = deployment.serving.router
    server = await start_server(
        r.host, r.port, key="serving.router.port", where=where, services=["jaxpd.v1.Generation"],
        register=lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(router, s))
    router.address = server.address
    router.on_health = server.set_serving
    await server.set_serving()
    log.info("router serving on %s (%d prefill, %d decode workers)", server.address,
             len(prefill_addrs), len(decode_addrs))
    announce("router", 0, server.address)
    try:
        await _until_signalled()
    finally:
        await server.stop()
        await router.close()


def run_role(role: str, deployment: DeploymentConfig, where: str, *, replica: int = 0,
             prefill_addresses: list[str] | None = None,
             decode_addresses: list[str] | None = None) -> None:
    """Run one role until SIGTERM/SIGINT. Raises JaxpdError for what the user must fix."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {role}-{replica} %(levelname)s %(message)s")
    # jax logs every accelerator platform it probes and does not find (e.g. libtpu) at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if role == "router":
        asyncio.run(_serve_router(deployment, where, prefill_addresses, decode_addresses))
        return
    group, key = worker_group(deployment, role)
    if not 0 <= replica < group.replicas:
        raise ConfigError(f"--replica {replica}: {key}.replicas is {group.replicas}")
    asyncio.run(_serve_worker(role, replica, deployment, where))
