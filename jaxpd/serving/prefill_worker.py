"""The prefill worker: chunked prefill with continuous batching and prefix caching; each
finished chunk's KV is pushed to the request's decode worker while later chunks compute.

`PrefillScheduler` runs on the engine thread and owns the pages. `PrefillServicer` is the gRPC
side: it admits a request, relays the scheduler's events (KV ready, first token) to the
KVTransfer stream and to the router, and on every way out (done, cancelled, failed) makes sure
the scheduler releases the request's pages.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import grpc
import jax

from jaxpd.engine.prefill import PrefillEngine
from jaxpd.engine.request import Request, Sequence
from jaxpd.errors import CapacityError, JaxpdError
from jaxpd.request_check import DuplicateRequest, InvalidRequest
from jaxpd.serving.engine_thread import EngineThread
from jaxpd.serving.validate import status_of
from jaxpd.serving.worker_common import WorkerServicer, WorkerState, pool_counts
from jaxpd.transfer import wire
from jaxpd.transfer.grpc_stream import GrpcKVSender
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
    seq: Sequence
    emit: Callable[[object], None]  # called on the engine thread; hops to the handler's loop
    arrived: float
    started: float | None = None
    sent_upto: int = 0  # prompt tokens whose KV was handed to the sender


class PrefillScheduler:
    """Admission, chunk batches and KV hand-out for one prefill mesh (engine thread only)."""

    def __init__(self, prefill: PrefillEngine, *, record_digests: bool = False):
        self.prefill = prefill
        self.manager = prefill.manager
        self.waiting: collections.deque[_Job] = collections.deque()
        self.prefilling: list[_Job] = []
        self.sending: dict[str, _Job] = {}  # prefilled; pages held until decode acknowledges
        self.record_digests = record_digests
        self.digests: dict[str, tuple[int, int, int]] = {}

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling)

    def add(self, request: Request, seed: int, emit: Callable[[object], None]) -> None:
        if self._find(request.id) is not None:
            raise DuplicateRequest("request_id", f"{request.id!r} is already in flight; use a new id")
        self._check_fits(request)
        self.waiting.append(_Job(Sequence(request, seed), emit, time.monotonic()))

    def _check_fits(self, request: Request) -> None:
        cfg, capacity = self.prefill.runner.config, (self.manager.allocator.num_blocks - 1) * self.manager.page_size
        bad = [t for t in request.prompt_ids if not 0 <= t < cfg.vocab_size]
        if bad or not request.prompt_ids:
            raise JaxpdError(f"request {request.id!r}: prompt is empty or has ids outside [0, {cfg.vocab_size})")
        if len(request.prompt_ids) > capacity:
            raise CapacityError(f"request {request.id!r}: a {len(request.prompt_ids)}-token prompt "
                                f"does not fit this prefill worker's pool ({capacity} tokens)")

    def step(self) -> None:
        now = time.monotonic()
        while self.waiting and self.prefill.admit(self.waiting[0].seq):
            self.prefilling.append(self.waiting.popleft())
        if not self.prefilling:  # the head does not fit even an empty pool (checked at add)
            return
        for job in self.prefilling[:self.prefill.max_seqs]:
            job.started = job.started or now
        done = {s.id for s in self.prefill.step([j.seq for j in self.prefilling])}
        for job in list(self.prefilling):
            seq = job.seq
            if seq.id in done:  # the first token goes out before the last chunk's KV
                self.prefilling.remove(job)
                self._prefilled(job)
                if seq.finish_reason is not None:
                    continue
            if seq.num_computed > job.sent_upto:
                array, offset = wire.gather_tokens(self.manager.kv, self.manager.layout,
                                                   seq.pages.pages, job.sent_upto, seq.num_computed)
                job.emit(KVReady(array, offset, job.sent_upto, seq.num_computed))
                job.sent_upto = seq.num_computed
            if seq.id in done:
                job.emit(KVComplete())

    def _prefilled(self, job: _Job) -> None:
        seq, now = job.seq, time.monotonic()
        job.emit(Prefilled(seq.output_ids[0], seq.logprobs[0], seq.finish_reason,
                           seq.prompt_tokens_cached,
                           job.started - job.arrived, now - job.started))
        if seq.finish_reason is not None:  # nothing for a decode worker to continue
            self._release(seq)
            return
        if self.record_digests:
            crc, size = wire.prompt_kv_digest(self.manager.kv, self.manager.layout,
                                              seq.pages.pages, seq.prompt_len)
            self.digests[seq.id] = (crc, size, seq.prompt_len)
        self.sending[seq.id] = job

    def release(self, request_id: str) -> None:
        """Decode acknowledged, or the request ended: free its pages (cached blocks stay cached)."""
        job = self._find(request_id)
        if job is None:
            return
        for queue in (self.waiting, self.prefilling):
            if job in queue:
                queue.remove(job)
        self.sending.pop(request_id, None)
        self._release(job.seq)

    def fail_all(self, error: Exception | str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        """End every request here with `code` (the router moves them to other workers)."""
        message = error if isinstance(error, str) else f"prefill step failed: {error!r}"
        for job in [*self.waiting, *self.prefilling, *self.sending.values()]:
            job.emit(Failed(code, message))
            self.release(job.seq.id)

    def has_requests(self) -> bool:
        return bool(self.waiting or self.prefilling or self.sending)

    def _release(self, seq: Sequence) -> None:
        if seq.pages is not None:
            self.manager.release(seq.pages)
            seq.pages = None

    def _find(self, request_id: str) -> _Job | None:
        for job in [*self.waiting, *self.prefilling, *self.sending.values()]:
            if job.seq.id == request_id:
                return job
        return None

    def load(self) -> dict:
        """The load snapshot the engine thread publishes."""
        return {"running": len(self.prefilling), "waiting": len(self.waiting),
                "transferring": len(self.sending),
                "requests": len(self.waiting) + len(self.prefilling) + len(self.sending),
                **pool_counts(self.manager)}

    def tick(self) -> None:
        """Nothing expires here: a request's pages go when its handler ends (the KV push has a
        deadline, serving.kv_timeout_s)."""


class PrefillServicer(WorkerServicer, worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, state: WorkerState, scheduler: PrefillScheduler, thread: EngineThread):
        self.state, self.scheduler, self.thread = state, scheduler, thread
        self.sender = GrpcKVSender(state.wire, state.deployment.serving.kv_timeout_s)
        self.limits = dataclasses.replace(state.engine.limits(), kv_capacity=None)

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        if not request.kv_target:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "kv_target: a decode worker address is required")
        target = request.kv_target_name or "the decode worker"
        req, seed, events, emit = await self._accept(request.request, context)
        released, first, kv = False, None, None
        try:  # from here on, every way out releases what the engine thread holds for it
            try:
                await self.thread.call(lambda: self.scheduler.add(req, seed, emit))
            except JaxpdError as e:
                released = True
                code, message = (status_of(e) if isinstance(e, InvalidRequest)
                                 else (grpc.StatusCode.INVALID_ARGUMENT, str(e)))
                await context.abort(code, message)
            kv = self.sender.open(request.kv_target, req.id, request.request.request_token)
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
        except grpc.aio.AioRpcError as e:  # the push failed: its real cause reaches the router
            await context.abort(e.code(), f"KV push to {target} failed: {e.code().name}: "
                                          f"{e.details()}")
        finally:
            if not released:
                if kv is not None:
                    kv.cancel()
                self.thread.post(lambda: self.scheduler.release(req.id))
