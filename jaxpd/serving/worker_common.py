"""What both worker roles share: the model on the process's own mesh, the engine built on it,
the request check a worker runs on what the router sends, and the WorkerInfo / WorkerLoad / KV
digest answers (loads come from the engine thread's published snapshot, never from engine
state read on the event loop)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Iterable

import grpc

from jaxpd.config import DeploymentConfig, MeshSection
from jaxpd.engine.orchestrator import Engine
from jaxpd.model.config import ModelConfig
from jaxpd.request_check import InvalidRequest
from jaxpd.serving.validate import check_engine_request, status_of
from jaxpd.tokenizer import Tokenizer
from jaxpd.transfer.wire import WireContext
from jaxpd.v1 import generation_pb2, worker_pb2

SERVING, DRAINING = "serving", "draining"


@dataclasses.dataclass
class WorkerState:
    role: str  # prefill | decode | colocated
    replica: int
    deployment: DeploymentConfig
    engine: Engine  # colocated on this process's mesh; a prefill worker uses its prefill half
    model_config: ModelConfig
    wire: WireContext
    tokenizer: Tokenizer | None = None
    address: str = ""
    data_address: str = ""  # serving.transport tcp: the decode worker's data plane
    transfer_host: str = "127.0.0.1"  # serving.transport jax: where its transfer server listens
    metrics_url: str = ""
    state: str = SERVING  # draining once SIGTERM arrived: new requests are refused
    metrics: object | None = None  # jaxpd.serving.metrics.WorkerMetrics

    @property
    def name(self) -> str:
        return f"{self.role}-{self.replica}"

    def worker_info(self) -> generation_pb2.WorkerInfo:
        runner = self.engine.prefill.runner
        mesh = runner.mesh
        devices = list(mesh.devices.flat) if mesh is not None else []
        manager = runner.manager
        return generation_pb2.WorkerInfo(
            role=self.role, replica=self.replica, address=self.address,
            platform=devices[0].platform if devices else "cpu",
            device_kind=devices[0].device_kind if devices else "",
            num_devices=len(devices), tp=manager.layout.tp,
            mesh={k: int(v) for k, v in (mesh.shape.items() if mesh is not None else [])},
            kv_pages=manager.allocator.num_blocks - 1, page_size=manager.page_size,
            attention=runner.backend.name, pid=os.getpid(),
            model_fingerprint=self.wire.fingerprint.hex(), dtype=self.model_config.dtype,
            state=self.state, metrics_url=self.metrics_url)

    def worker_load(self, snapshot: dict) -> generation_pb2.WorkerLoad:
        counts = {k: snapshot.get(k, 0) for k in ("running", "waiting", "transferring",
                                                   "kv_pages_used", "kv_pages_free",
                                                   "kv_pages_total")}
        return generation_pb2.WorkerLoad(role=self.role, replica=self.replica,
                                         address=self.address, state=self.state, **counts)

    @staticmethod
    def digests(recorded: dict[str, tuple[int, int, int]],
                ids: Iterable[str]) -> worker_pb2.KVDigests:
        out = worker_pb2.KVDigests()
        for rid in ids or recorded:
            if rid in recorded:
                crc, size, tokens = recorded[rid]
                out.digests[rid].CopyFrom(worker_pb2.KVDigest(crc32c=crc, bytes=size, num_tokens=tokens))
        return out


def pool_counts(manager) -> dict:
    """KV page counts of a pool (engine thread: part of a load snapshot)."""
    allocator = manager.allocator
    return {"kv_pages_used": allocator.num_used, "kv_pages_free": allocator.num_free,
            "kv_pages_total": allocator.num_blocks - 1}


def local_deployment(deployment: DeploymentConfig, tp: int) -> DeploymentConfig:
    """The deployment as one worker process sees it: one colocated mesh on its local devices
    0..tp-1 (the launcher made exactly its own devices visible)."""
    return deployment.model_copy(update={
        "mode": "colocated", "prefill": (MeshSection(devices=list(range(tp)), tp=tp),),
        "decode": None})


class WorkerServicer:
    """What both worker services share (subclasses set `state`, `scheduler`, `thread`): the
    admission checks before a request reaches the engine thread, and the read-only calls."""

    async def _accept(self, request: worker_pb2.EngineRequest, context):
        """(request, seed, events queue, emit) for a new request, or abort the call:
        UNAVAILABLE while draining or broken, RESOURCE_EXHAUSTED when the worker's queue is
        full, INVALID_ARGUMENT for what the request check refuses. `emit` is called on the
        engine thread and delivers onto this call's event loop."""
        if self.state.state != SERVING or self.thread.broken is not None:
            why = "is draining" if self.state.state == DRAINING else "failed a step and restarts"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.state.name} {why}")
        waiting, limit = self.thread.snapshot.get("waiting", 0), self.state.deployment.serving.max_waiting
        if waiting >= limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.state.name}: "
                                f"{waiting} requests already waiting (serving.max_waiting={limit})")
        try:
            req, seed = check_engine_request(request, self.limits, self.state.tokenizer)
        except InvalidRequest as e:
            await context.abort(*status_of(e))
        events: asyncio.Queue = asyncio.Queue()
        return req, seed, events, lambda ev: self.thread.deliver(events.put_nowait, ev)

    async def GetWorkerInfo(self, request, context):
        return self.state.worker_info()

    async def GetLoad(self, request, context):
        return self.state.worker_load(self.thread.snapshot)

    async def GetKVDigests(self, request, context):
        ids = list(request.request_ids)  # the digests live on the engine thread: read them there
        return await self.thread.call(lambda: self.state.digests(self.scheduler.digests, ids))


