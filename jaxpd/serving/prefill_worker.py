"""The prefill worker: chunked prefill with continuous batching and prefix caching; each
finished chunk's KV is pushed to the request's decode worker while later chunks compute.

`PrefillScheduler` runs on the engine thread and owns the pages. `PrefillServicer` is the gRPC
side: it admits a request, relays the scheduler's events (KV ready, first token) to the
KVTransfer stream and to the router, and on every way out (done, cancelled, failed) makes sure
the scheduler releases the request's pages.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import grpc
import jax

from jaxpd.engine.orchestrator import Engine
from jaxpd.engine.request import Request, Sequence
from jaxpd.errors import JaxpdError
from jaxpd.request_check import InvalidRequest
from jaxpd.serving.engine_thread import EngineThread
from jaxpd.serving.validate import status_of
from jaxpd.serving.worker_common import WorkerServicer, WorkerState, pool_counts
from jaxpd.transfer.grpc_stream import GrpcKVSender
from jaxpd.transfer.jax_plane import JaxKVSender
from jaxpd.transfer.tcp_plane import TcpKVSender, TransferFailed, choose_transport
from jaxpd.v1 import worker_pb2, worker_pb2_grpc


# -- events from the engine thread to a request's handler --------------------------------------
@dataclasses.dataclass(frozen=True)
class KVReady:
    array: jax.Array  # gather_tokens result, still on device
    offset: int
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Prefilled:
    token: int
    logprob: float
    finish_reason: str | None  # set when the first token ends the request (it is then the match)
    cached_tokens: int
    queue_s: float
    prefill_s: float


@dataclasses.dataclass(frozen=True)
class KVComplete:
    """Every KVReady of the request was emitted before this."""


@dataclasses.dataclass(frozen=True)
class Failed:
    code: grpc.StatusCode
    message: str


@dataclasses.dataclass
class _Job:
    emit: Callable[[object], None]  # called on the engine thread; hops to the handler's loop
    arrived: float
    started: float | None = None
    sent_upto: int = 0  # prompt tokens whose KV was handed to the sender (or not needed)
    done: bool = False  # KVComplete emitted


class PrefillScheduler:
    """The engine thread's side of a prefill worker: the one `Engine` (as every worker and
    `jaxpd generate` use it) in its `send_prefilled` mode, where a prefilled request keeps its
    pages in the SENDING_KV state until the decode worker holds its KV. This adapter only turns
    the engine's progress into events for the request's handler: each chunk's KV as it is
    computed, the first token, the end of the KV."""

    def __init__(self, engine: Engine, *, record_digests: bool = False,
                 kv_timeout_s: float = 120.0):
        self.engine, self.kv_timeout_s = engine, kv_timeout_s
        engine.send_prefilled = True
        self.manager = engine.prefill.manager
        self.runner = engine.prefill.runner  # device ops go through it (multi-host lockstep)
        self.jobs: dict[str, _Job] = {}
        self.record_digests = record_digests
        self.digests: dict[str, tuple[int, int, int]] = {}

    def has_work(self) -> bool:
        return self.engine.has_work()

    def add(self, request: Request, seed: int, emit: Callable[[object], None],
            skip_tokens: int = 0) -> None:
        """Raises InvalidRequest (DuplicateRequest for an id in flight) or CapacityError.
        `skip_tokens`: the decode worker holds the prompt's KV before that token already."""
        self.engine.add_request(dataclasses.replace(
            request, sampling=dataclasses.replace(request.sampling, seed=seed)))
        self.jobs[request.id] = _Job(emit, time.monotonic(), sent_upto=skip_tokens)

    def step(self) -> None:
        now = time.monotonic()
        engine = self.engine
        outputs = engine.step()
        for seq in [*engine.prefilling, *engine.sending.values()]:
            job = self.jobs.get(seq.id)
            if job is not None and job.started is None:
                job.started = now
        for out in outputs:  # the first token ended it (stop or length): nothing to send
            job = self.jobs.get(out.id) if out.finished else None
            if job is not None:
                del self.jobs[out.id]
                started = job.started or now
                job.emit(Prefilled(out.token_ids[0], out.logprobs[0] if out.logprobs else 0.0,
                                   out.finish_reason, out.prompt_tokens_cached,
                                   started - job.arrived, time.monotonic() - started))
        for seq in [*engine.prefilling, *engine.sending.values()]:
            job = self.jobs.get(seq.id)
            if job is None or job.done:
                continue
            done = seq.id in engine.sending  # prefilled this step: its last chunk is unsent
            if done:  # the first token goes out before the last chunk's KV
                self._prefilled(seq, job)
            if job.sent_upto < seq.num_computed:
                array, offset = self.runner.gather_kv(seq.pages.pages, job.sent_upto,
                                                      seq.num_computed)
                job.emit(KVReady(array, offset, job.sent_upto, seq.num_computed))
                job.sent_upto = seq.num_computed
            if done:
                job.done = True
                job.emit(KVComplete())

    def _prefilled(self, seq: Sequence, job: _Job) -> None:
        job.emit(Prefilled(seq.output_ids[0], seq.logprobs[0], None, seq.prompt_tokens_cached,
                           job.started - job.arrived, time.monotonic() - job.started))
        if self.record_digests:
            crc, size = self.runner.kv_digest(seq.pages.pages, seq.prompt_len)
            self.digests[seq.id] = (crc, size, seq.prompt_len)

    def release(self, request_id: str) -> None:
        """Decode acknowledged, or the request ended: free its pages (cached blocks stay cached)."""
        self.jobs.pop(request_id, None)
        if request_id in self.engine.sending:
            self.engine.release_sent(request_id)
        else:
            self.engine.abort(request_id)

    def fail_all(self, error: Exception | str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        """End every request here with `code` (the router moves them to other workers)."""
        message = error if isinstance(error, str) else f"prefill step failed: {error!r}"
        for rid, job in list(self.jobs.items()):
            job.emit(Failed(code, message))
            self.release(rid)

    def load(self) -> dict:
        """The load snapshot the engine thread publishes."""
        e = self.engine
        return {"running": len(e.prefilling), "waiting": len(e.waiting),
                "transferring": len(e.sending), "requests": len(self.jobs),
                "preemptions": e.num_preemptions, **pool_counts(self.manager)}

    def tick(self) -> None:
        """Expire what a handler should have ended already: a request whose KV has not been
        acknowledged `kv_timeout_s` after it arrived (its push carries that deadline too; this
        is the scheduler's own backstop, so no page outlives its lease)."""
        now = time.monotonic()
        for rid, job in list(self.jobs.items()):
            if rid in self.engine.sending and now - job.arrived > self.kv_timeout_s + 1.0:
                job.emit(Failed(grpc.StatusCode.DEADLINE_EXCEEDED, f"request {rid!r}: its KV was "
                                f"not acknowledged within {self.kv_timeout_s:g} s "
                                f"(serving.kv_timeout_s); pages freed"))
                self.release(rid)


class PrefillServicer(WorkerServicer, worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, state: WorkerState, scheduler: PrefillScheduler, thread: EngineThread):
        self.state, self.scheduler, self.thread = state, scheduler, thread
        timeout = state.deployment.serving.kv_timeout_s
        self.sender = GrpcKVSender(state.wire, timeout)
        self.tcp_sender = TcpKVSender(state.wire, timeout)  # kv_target "tcp://...": a data plane
        self.shm_sender = TcpKVSender(state.wire, timeout, shared_memory=True)  # "shm://..."
        self._jax_sender = None  # "jax://...": JAX's transfer server, started on first use
        mesh = self.scheduler.runner.mesh
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.devices()[0].platform
        self.on_accelerator = platform != "cpu"
        self.limits = dataclasses.replace(state.engine.limits(), kv_capacity=None)

    def _sender(self, target: str):
        """(the sender for a reservation's KV target, the address to open): see
        `tcp_plane.choose_transport`."""
        kind, address = choose_transport(target, self.on_accelerator)
        if kind == "jax" and self._jax_sender is None:  # its transfer server starts on first use
            self._jax_sender = JaxKVSender(self.state.wire, self.tcp_sender.timeout_s,
                                           self.state.transfer_host)
        return {"grpc": self.sender, "tcp": self.tcp_sender, "shm": self.shm_sender,
                "jax": self._jax_sender}[kind], address

    def close(self) -> None:
        """Close the pooled data-plane connections (unlinking their shared memory)."""
        self.tcp_sender.close()
        self.shm_sender.close()

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        if not request.kv_target:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "kv_target: a decode worker address is required")
        target = request.kv_target_name or "the decode worker"
        req, seed, events, emit = await self._accept(request.request, context)
        released, first, kv = False, None, None
        try:  # from here on, every way out releases what the engine thread holds for it
            skip = request.kv_skip_tokens
            try:
                if skip > len(req.prompt_ids):
                    raise InvalidRequest("kv_skip_tokens", f"{skip} is more than the prompt's "
                                         f"{len(req.prompt_ids)} tokens")
                await self.thread.call(lambda: self.scheduler.add(req, seed, emit, skip))
            except JaxpdError as e:
                released = True
                code, message = (status_of(e) if isinstance(e, InvalidRequest)
                                 else (grpc.StatusCode.INVALID_ARGUMENT, str(e)))
                await context.abort(code, message)
            sender, address = self._sender(request.kv_target)
            kv = sender.open(address, req.id, request.request.request_token)
            began = time.monotonic()
            while True:
                ev = await events.get()
                if isinstance(ev, Failed):
                    released = True
                    await context.abort(ev.code, ev.message)
                elif isinstance(ev, KVReady):
                    await kv.send_tokens(ev.array, ev.offset, ev.start, ev.end)
                elif isinstance(ev, Prefilled):
                    first = ev
                    yield worker_pb2.PrefillEvent(first_token=worker_pb2.FirstToken(
                        token_id=ev.token, logprob=ev.logprob, finish_reason=ev.finish_reason or "",
                        cached_tokens=ev.cached_tokens, queue_s=ev.queue_s, prefill_s=ev.prefill_s))
                    if ev.finish_reason is not None:  # the scheduler already freed the pages
                        released = True
                        return
                elif isinstance(ev, KVComplete):
                    break
            await kv.finish(len(req.prompt_ids), first.token, first.logprob)
            if self.state.metrics is not None:
                self.state.metrics.kv_moved("sent", kv.bytes, began)
            self.thread.post(lambda: self.scheduler.release(req.id))
            released = True
            yield worker_pb2.PrefillEvent(kv_sent=worker_pb2.KVSent(bytes=kv.bytes,
                                                                    messages=kv.messages))
        except (grpc.aio.AioRpcError, TransferFailed) as e:  # the push failed: its cause goes on
            await context.abort(e.code(), f"KV push to {target} failed: {e.code().name}: "
                                          f"{e.details()}")
        finally:
            if not released:
                if kv is not None:
                    kv.cancel()
                self.thread.post(lambda: self.scheduler.release(req.id))
