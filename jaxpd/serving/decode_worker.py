"""The decode worker: reserves pages when the router asks, receives the prompt's KV over
KVTransfer into its pool (in its own TP layout), joins the request to continuous batching and
streams its tokens. With `local_prefill` it prefills the prompt itself: a colocated worker is
this same code with no prefill workers in front of it.

`DecodeScheduler` runs on the engine thread around an `Engine` on this worker's one pool.
`DecodeServicer` is the gRPC side (DecodeWorker and KVTransfer); every way out of a Decode call
that did not finish (cancel, deadline, a failed transfer, the KV never arriving) aborts the
request on the engine thread, which frees its pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
from typing import Callable

import grpc
import jax
import numpy as np

from jaxpd.engine.orchestrator import Engine
from jaxpd.engine.request import Request, RequestOutput
from jaxpd.errors import JaxpdError
from jaxpd.request_check import InvalidRequest
from jaxpd.serving.engine_thread import EngineThread
from jaxpd.serving.validate import status_of
from jaxpd.serving.worker_common import WorkerServicer, WorkerState, pool_counts
from jaxpd.transfer import wire
from jaxpd.v1 import worker_pb2, worker_pb2_grpc

# A truncated stream is ABORTED, not INVALID_ARGUMENT: its sender died or gave up mid-transfer,
# and the router moves the request (it migrates on ABORTED).
_STATUS = {"precondition": grpc.StatusCode.FAILED_PRECONDITION,
           "data_loss": grpc.StatusCode.DATA_LOSS, "invalid": grpc.StatusCode.INVALID_ARGUMENT,
           "truncated": grpc.StatusCode.ABORTED}


class TransferError(JaxpdError):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Failed:
    code: grpc.StatusCode
    message: str


@dataclasses.dataclass
class _Sub:
    emit: Callable[[object], None]
    arrived: float
    sent: int = 0  # tokens already streamed
    local: bool = True
    started: float | None = None  # local prefill: first step that worked on it
    coverage: np.ndarray | None = None  # remote: bool[layers, prompt tokens] written
    token: str = ""  # the request token KV frames must carry
    pushing: bool = False  # a PushKV call holds the lease on this reservation


class DecodeScheduler:
    """The engine thread's side of a decode worker."""

    def __init__(self, engine: Engine, ctx: wire.WireContext, *, record_digests: bool = False,
                 kv_timeout_s: float = 120.0, name: str = "decode"):
        self.engine, self.ctx, self.name = engine, ctx, name
        self.manager = engine.decode.manager
        self.runner = engine.decode.runner  # device ops go through it (multi-host lockstep)
        self.subs: dict[str, _Sub] = {}
        self.record_digests = record_digests
        self.digests: dict[str, tuple[int, int, int]] = {}
        self.kv_timeout_s = kv_timeout_s

    def has_work(self) -> bool:
        return self.engine.has_work()

    # -- commands (engine thread) --------------------------------------------------------------
    def add_local(self, request: Request, seed: int, emit) -> None:
        self.engine.add_request(dataclasses.replace(
            request, sampling=dataclasses.replace(request.sampling, seed=seed)))
        self.subs[request.id] = _Sub(emit, time.monotonic())

    def reserve(self, request: Request, seed: int, emit, token: str) -> tuple[int, int] | None:
        """(pages reserved for the prompt's KV, leading prompt tokens already held in the
        prefix cache), or None when the pool cannot hold it now. The reservation expires after
        `kv_timeout_s` unless all of the KV arrived (`tick`)."""
        seq = self.engine.reserve_remote(request, seed)
        if seq is None:
            return None
        cached = seq.pages.num_cached
        coverage = np.zeros((self.ctx.layout.num_layers, len(request.prompt_ids)), bool)
        coverage[:, :cached] = True  # those pages are shared cache blocks: never written
        self.subs[request.id] = _Sub(emit, time.monotonic(), local=False, coverage=coverage,
                                     token=token)
        return len(seq.pages.pages), cached

    def authorize(self, request_id: str, token: str) -> None:
        """Before a PushKV writes anything: the request must hold a reservation here and the
        frames must carry its token, and only one push at a time holds the lease."""
        sub = self.subs.get(request_id)
        if sub is None or request_id not in self.engine.receiving:
            raise TransferError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} has no pages "
                                f"reserved on {self.name} (aborted, expired, or never reserved)")
        if not token or not hmac.compare_digest(token, sub.token):
            raise TransferError(grpc.StatusCode.PERMISSION_DENIED, f"request {request_id!r}: the "
                                f"KV frames carry the wrong request token")
        if sub.pushing:
            raise TransferError(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r}: another "
                                f"KV push for it is in progress")
        sub.pushing = True

    def tick(self) -> None:
        """Expire reservations whose KV did not arrive within `kv_timeout_s`."""
        now = time.monotonic()
        for rid, sub in list(self.subs.items()):
            if not sub.local and rid in self.engine.receiving and now - sub.arrived > self.kv_timeout_s:
                self.fail(rid, grpc.StatusCode.DEADLINE_EXCEEDED, f"request {rid!r}: its KV did "
                          f"not arrive within {self.kv_timeout_s:g} s (serving.kv_timeout_s); "
                          f"pages freed")

    def write(self, piece: wire.KVPiece) -> None:
        h = piece.header
        seq = self.engine.receiving.get(h.request_id)
        if seq is None:
            raise TransferError(grpc.StatusCode.NOT_FOUND, f"request {h.request_id!r} has no pages "
                                f"reserved on {self.name} (aborted, or never reserved)")
        if h.token_end > seq.prompt_len:
            raise TransferError(grpc.StatusCode.INVALID_ARGUMENT, f"request {h.request_id!r}: KV for "
                                f"tokens up to {h.token_end} but the prompt has {seq.prompt_len}")
        piece = wire.trim_tokens(piece, seq.pages.num_cached)  # cached blocks stay as they are
        if piece is None:
            return
        self.runner.write_kv(seq.pages.pages, piece)
        self.subs[h.request_id].coverage[h.layer_start:h.layer_end, h.token_start:h.token_end] = True

    def finish_transfer(self, request_id: str, finish: worker_pb2.KVFinish, received: int) -> None:
        sub, seq = self.subs.get(request_id), self.engine.receiving.get(request_id)
        if sub is None or seq is None:
            raise TransferError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is no longer "
                                f"reserved on this decode worker")
        if finish.num_tokens != seq.prompt_len or not sub.coverage.all():
            missing = int((~sub.coverage).sum())
            raise TransferError(grpc.StatusCode.DATA_LOSS, f"request {request_id!r}: KV incomplete "
                                f"({missing} layer-tokens of {sub.coverage.size} never arrived)")
        if self.record_digests:
            crc, size = self.runner.kv_digest(seq.pages.pages, seq.prompt_len)
            self.digests[request_id] = (crc, size, seq.prompt_len)
        sub.emit(worker_pb2.DecodeEvent(kv_received=worker_pb2.KVReceived(bytes=received)))
        out = self.engine.start_remote(request_id, finish.first_token, finish.first_logprob)
        sub.sent = 1  # the router has the first token from the prefill worker
        if out.finished:
            self._publish(out)

    def fail(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        sub = self.subs.pop(request_id, None)
        self.engine.abort(request_id)
        if sub is not None:
            sub.emit(Failed(code, message))

    def abort(self, request_id: str) -> None:
        self.subs.pop(request_id, None)
        self.engine.abort(request_id)

    def fail_all(self, error: Exception | str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        """End every request here with `code` (the router moves them to other workers)."""
        message = error if isinstance(error, str) else f"{self.name}: engine step failed: {error!r}"
        for rid in list(self.subs):
            self.fail(rid, code, message)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> None:
        now = time.monotonic()
        outputs = self.engine.step()
        for seq in self.engine.prefilling:
            sub = self.subs.get(seq.id)
            if sub is not None and sub.started is None:
                sub.started = now
        for out in outputs:
            self._publish(out, now)

    def _publish(self, out: RequestOutput, step_start: float | None = None) -> None:
        sub = self.subs.get(out.id)
        if sub is None:
            return
        if sub.local and sub.sent == 0 and out.token_ids:
            started = sub.started or step_start or time.monotonic()
            sub.emit(worker_pb2.DecodeEvent(prefilled=worker_pb2.Prefilled(
                cached_tokens=out.prompt_tokens_cached, queue_s=started - sub.arrived,
                prefill_s=time.monotonic() - started)))
        new = out.token_ids[sub.sent:]
        sub.sent = len(out.token_ids)
        tokens = worker_pb2.Tokens(token_ids=new, finish_reason=out.finish_reason or "")
        if out.logprobs is not None:
            tokens.logprobs.extend(out.logprobs[len(out.token_ids) - len(new):])
        if out.finished and out.matched_token_id is not None:
            tokens.matched_token_id = out.matched_token_id
        if new or out.finished:
            sub.emit(worker_pb2.DecodeEvent(tokens=tokens))
        if out.finished:
            self.subs.pop(out.id, None)

    def load(self) -> dict:
        """The load snapshot the engine thread publishes."""
        e = self.engine
        return {"running": len(e.running) + len(e.prefilling) + len(e.handoff),
                "waiting": len(e.waiting), "transferring": len(e.receiving),
                "requests": len(self.subs), "preemptions": e.num_preemptions,
                **pool_counts(self.manager)}


class DecodeServicer(WorkerServicer, worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, state: WorkerState, scheduler: DecodeScheduler, thread: EngineThread):
        self.state, self.scheduler, self.thread = state, scheduler, thread
        self.limits = state.engine.limits()
        self._puller = None

    def puller(self):
        """serving.transport: jax: this worker's JAX transfer-server client (started on the
        first pull frame), pulling onto the decode mesh's first device."""
        if self._puller is None:
            from jaxpd.transfer.jax_plane import JaxKVPuller

            mesh = self.scheduler.manager.mesh
            device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
            self._puller = JaxKVPuller(device, self.state.transfer_host)
        return self._puller

    async def Decode(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        req, seed, events, emit = await self._accept(request.request, context)
        token = request.request.request_token
        finished = False
        try:  # from here on, every way out frees whatever the engine thread reserved
            try:
                if request.local_prefill:
                    await self.thread.call(lambda: self.scheduler.add_local(req, seed, emit))
                    reserved = (0, 0)
                else:
                    reserved = await self.thread.call(  # host bookkeeping: answered even
                        lambda: self.scheduler.reserve(req, seed, emit, token),  # mid-call
                        while_device_runs=True)
            except InvalidRequest as e:
                finished = True
                await context.abort(*status_of(e))
            if reserved is None:
                finished = True
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.state.name} has "
                                    f"no free KV pages for {len(req.prompt_ids) + 1} tokens right now")
            pages, cached = reserved
            yield worker_pb2.DecodeEvent(reserved=worker_pb2.Reserved(
                pages=pages, data_address=self.state.data_address if pages else "",
                cached_tokens=cached))
            while True:
                ev = await events.get()
                if isinstance(ev, Failed):
                    finished = True  # the scheduler already dropped it
                    await context.abort(ev.code, ev.message)
                yield ev
                if ev.HasField("tokens") and ev.tokens.finish_reason:
                    finished = True
                    return
        finally:
            if not finished:
                self.thread.post(lambda: self.scheduler.abort(req.id))

    async def PushKV(self, frames, context: grpc.aio.ServicerContext):
        """KVTransfer.PushKV; `frames` are raw KVChunk encodings (see transfer/wire.py). Nothing
        is written before the first frame's request id and token are authorized, and a push
        that is refused (unknown request, wrong token) never harms the request it names."""
        intake = KVIntake(self)
        try:
            async for raw in frames:
                _, ack = await intake.take(raw)
                if ack is not None:
                    return ack
            raise wire.WireError("truncated", f"the KV stream for {intake.request_id!r} ended "
                                 f"without its finish message (the prefill side stopped sending)")
        except (wire.WireError, TransferError) as e:
            await context.abort(*intake.failed(e))
        except asyncio.CancelledError:
            intake.cancelled("the prefill worker cancelled the KV transfer")
            raise


class KVIntake:
    """One request's KV push as the decode worker takes it, whatever carries the frames (a
    PushKV call, a data-plane connection): the first frame's request id and token are
    authorized before anything is written; every frame is checked (model fingerprint, layout,
    CRC-32C) and written on the engine thread; the finish frame completes the transfer once
    every write is done. `copy`: the frames live in buffers the transport reuses, so each
    piece's payload is copied before it leaves for the engine thread."""

    def __init__(self, servicer: DecodeServicer, *, copy: bool = False):
        self.servicer, self.copy = servicer, copy
        self.state, self.scheduler, self.thread = (servicer.state, servicer.scheduler,
                                                   servicer.thread)
        self.request_id: str | None = None
        self.token: str | None = None
        self.authorized = False
        self.received = self.count = 0
        self.pending: list = []
        self.began = time.monotonic()

    async def take(self, raw, *,
                   verify_crc: bool = True) -> tuple[object | None, worker_pb2.KVAck | None]:
        """Check one frame and send its piece to the engine thread: (the pending write or
        None, the KVAck when this was the finish frame). Raises WireError/TransferError.
        `verify_crc=False`: a frame read from shared memory, which carries no checksum."""
        header, payload = wire.parse_frame(raw)
        if self.request_id is None:
            self.request_id, self.token = header.request_id, header.request_token
            rid, token = self.request_id, self.token
            await self.thread.call(lambda: self.scheduler.authorize(rid, token))
            self.authorized = True
        elif header.request_id != self.request_id or header.request_token != self.token:
            raise wire.WireError("invalid", f"one push carries one request: got "
                                 f"{header.request_id!r} after {self.request_id!r}")
        if header.HasField("pull"):  # serving.transport: jax: fetch what the frame names
            wire.check_pull(self.state.wire, header)
            piece = await self.servicer.puller().pull(
                header, self.state.deployment.serving.kv_timeout_s)
            self.received += piece.array.nbytes
        else:
            piece = wire.check_piece(self.state.wire, header, payload, verify_crc=verify_crc)
        self.received += len(raw)
        self.count += 1
        write = None
        if piece.array is not None:
            if self.copy:
                piece = wire.KVPiece(piece.header, piece.array.copy())
            write = self.thread.call(lambda p=piece: self.scheduler.write(p))
            self.pending.append(write)
        if not header.HasField("finish"):
            return write, None
        await asyncio.gather(*self.pending)
        rid, received = self.request_id, self.received
        await self.thread.call(lambda: self.scheduler.finish_transfer(rid, header.finish,
                                                                      received))
        if self.state.metrics is not None:
            self.state.metrics.kv_moved("received", received, self.began)
        return None, worker_pb2.KVAck(request_id=rid, bytes=received, messages=self.count)

    def failed(self, e: Exception) -> tuple[grpc.StatusCode, str]:
        """(status, message) for a refused or broken push; the request it belongs to (once
        authorized) fails with it, since it cannot go on here."""
        code = _STATUS[e.kind] if isinstance(e, wire.WireError) else e.code
        message = str(e)
        if self.authorized:
            rid = self.request_id
            self.thread.post(lambda: self.scheduler.fail(rid, code,
                                                         f"KV transfer failed: {message}"))
        return code, message

    def cancelled(self, why: str) -> None:
        """The sender went away mid-push: the request fails ABORTED (it migrates)."""
        if self.authorized:
            rid = self.request_id
            self.thread.post(lambda: self.scheduler.fail(rid, grpc.StatusCode.ABORTED, why))


def kv_transfer_handler(servicer: DecodeServicer) -> grpc.GenericRpcHandler:
    """KVTransfer with raw frames in (no protobuf parse of the payload) and KVAck out."""
    return grpc.method_handlers_generic_handler("jaxpd.v1.KVTransfer", {
        "PushKV": grpc.stream_unary_rpc_method_handler(
            servicer.PushKV, request_deserializer=None,
            response_serializer=worker_pb2.KVAck.SerializeToString)})
