"""The router: jaxpd's public Generation service, in front of prefill and decode workers.

A request's walk: the one request check runs off the event loop (it tokenizes); a decode worker
reserves pages for it (the most free pages first, counting what this router sent since the last
load report; when every pool is full the request waits in a bounded FCFS queue, and only a full
queue answers RESOURCE_EXHAUSTED); a prefill worker (the least busy, preferring one whose prefix
cache likely holds the prompt) computes the prompt's KV and pushes it to that decode worker; the
router merges the two streams into one, the first token from prefill and the rest from decode,
detokenizing and matching stop strings in the same `TextStream` as `jaxpd generate`.

Each pass through the workers is an *attempt*. When a worker of an attempt dies, freezes past
the liveness deadline, drains or fails a step, the request moves on (request migration, as NVIDIA
Dynamo calls it): the next attempt's prompt is the original prompt plus every token already
generated, its sampling counters start after them (`EngineRequest.sample_offset`), and its
max_tokens is what is left, so the client's stream continues where it stopped with nothing lost
or repeated, and greedy or seeded output equals an uninterrupted run. A request migrates at most
`serving.max_migrations` times, then fails UNAVAILABLE naming the worker. Attempts use their own
worker-side ids and per-attempt request tokens, so a late message from an abandoned attempt can
never touch the next one.

Whatever ends the call (completion, a stop string, `Abort`, the client cancelling, its deadline)
cancels the worker calls, which frees the pages on both sides. Messages name workers by role and
replica (`decode-1`), never by internal address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import random
import secrets
import time
import uuid
from typing import Callable

import grpc

from jaxpd import __version__
from jaxpd.config import DeploymentConfig
from jaxpd.engine.output import TextStream
from jaxpd.engine.request import Request
from jaxpd.model.config import ModelConfig
from jaxpd.request_check import DuplicateRequest, InvalidRequest, Limits
from jaxpd.serving.convert import engine_request_to_pb
from jaxpd.serving.grpc_server import internal_metadata
from jaxpd.serving.metrics import RouterMetrics
from jaxpd.serving.validate import ValidRequest, check_generate, status_of
from jaxpd.serving.worker_pool import WorkerHandle, WorkerPool, prefix_hashes
from jaxpd.tokenizer import Tokenizer
from jaxpd.v1 import generation_pb2, generation_pb2_grpc, worker_pb2

log = logging.getLogger(__name__)

# Codes a worker's call ends with when the worker, not the request, is the problem: the request
# moves to another worker. Anything else (a bad request, another model) is the client's answer.
MIGRATE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
           grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
           grpc.StatusCode.DATA_LOSS}
RETRY_PUSHBACK_MS = "1000"


class RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Draining(RequestFailed):
    """The deployment is draining: retry elsewhere (gRPC adds a retry pushback)."""


class _NoneServing(RequestFailed):
    """No decode worker serves right now (all down or restarting)."""


class WorkerLost(Exception):
    """An attempt's worker failed (or stopped serving): the request migrates."""

    def __init__(self, worker: WorkerHandle | None, message: str):
        super().__init__(message)
        self.workers = {worker} if worker is not None else set()


@dataclasses.dataclass
class _Progress:
    """One request's state in the router, across attempts: timings and what was generated."""

    received: float
    prompt_tokens: int
    generated: list[int] = dataclasses.field(default_factory=list)  # every token accepted
    completion_tokens: int = 0  # tokens streamed to the client
    cached_tokens: int = 0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    first_token_at: float | None = None
    kv_in_at: float | None = None
    worker_queue_from: float = 0.0
    migrations: int = 0
    last_chunk_at: float | None = None

    def timings(self) -> generation_pb2.Timings:
        now = time.monotonic()
        first = self.first_token_at
        transfer = max(0.0, self.kv_in_at - first) if (self.kv_in_at and first) else 0.0
        return generation_pb2.Timings(queue_s=self.queue_s, prefill_s=self.prefill_s,
                                      transfer_s=transfer,
                                      ttft_s=(first - self.received) if first else 0.0,
                                      total_s=now - self.received)


class Router(generation_pb2_grpc.GenerationServicer):
    def __init__(self, deployment: DeploymentConfig, model_config: ModelConfig,
                 tokenizer: Tokenizer | None, model_name: str, *, pool: WorkerPool,
                 address: str = ""):
        self.deployment, self.config, self.tokenizer = deployment, model_config, tokenizer
        self.serving = deployment.serving
        self.model_name, self.address = model_name, address
        self.pool = pool
        self.local_prefill = not pool.prefill  # colocated: decode workers prefill themselves
        self.inflight: dict[str, asyncio.Event] = {}
        self.queue: list[object] = []  # FCFS tickets of requests waiting for KV pages
        self.draining = False
        self.metrics_url = ""
        self.metrics = RouterMetrics(lambda: len(self.inflight), lambda: len(self.queue))
        self._rng = random.Random()
        # the request check tokenizes: off the event loop, so one huge prompt stalls no one
        self._checker = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="check")

    def limits(self) -> Limits:
        page_size = self.deployment.kv.page_size
        largest = self.pool.largest_decode_pool()
        return Limits.of(self.config, largest * page_size if largest else None)

    async def close(self) -> None:
        await self.pool.close()
        self._checker.shutdown(wait=False, cancel_futures=True)

    # -- Generate --------------------------------------------------------------------------------
    async def Generate(self, request: generation_pb2.GenerateRequest, context):
        try:
            async for response in self.generate(request, context.time_remaining()):
                yield response
        except InvalidRequest as e:
            await context.abort(*status_of(e))
        except RequestFailed as e:
            if isinstance(e, Draining):
                context.set_trailing_metadata((("grpc-retry-pushback-ms", RETRY_PUSHBACK_MS),))
            await context.abort(e.code, str(e))

    async def generate(self, request: generation_pb2.GenerateRequest,
                       time_remaining: float | None = None,
                       on_valid: Callable[[ValidRequest], None] | None = None):
        """The Generate path for any front end (gRPC, HTTP): responses as they come. Raises
        InvalidRequest for what the request got wrong, RequestFailed (a gRPC status code and a
        message; Draining while the deployment drains) for anything else. `time_remaining`:
        the caller's deadline; `on_valid` sees the checked request (its prompt's token ids)
        before the first response. Closing the iterator early cancels the request and frees
        its pages."""
        received = time.monotonic()
        if self.draining:
            self.metrics.errors.labels("UNAVAILABLE").inc()
            raise Draining(grpc.StatusCode.UNAVAILABLE, "this jaxpd deployment is draining "
                           "(shutting down); retry the request on another replica")
        loop = asyncio.get_running_loop()
        try:
            valid = await loop.run_in_executor(self._checker, check_generate, request,
                                               self.limits(), self.tokenizer)
            rid = request.request_id or uuid.uuid4().hex
            if rid in self.inflight:
                raise DuplicateRequest("request_id", f"{rid!r} is already in flight; use a new id")
        except InvalidRequest as e:
            self.metrics.errors.labels(status_of(e)[0].name).inc()
            raise
        if on_valid is not None:
            on_valid(valid)
        aborted = asyncio.Event()
        self.inflight[rid] = aborted
        ended = False
        try:
            async for response in self._generate(rid, valid, received, aborted, time_remaining):
                ended = response.HasField("complete")
                yield response
        except RequestFailed as e:
            ended = True
            self.metrics.errors.labels(e.code.name).inc()
            raise
        finally:
            if not ended:  # the client cancelled, or its deadline passed
                self.metrics.errors.labels("CANCELLED").inc()
            self.inflight.pop(rid, None)
            self.pool.notify()  # its pages are free: wake a queued request

    async def _generate(self, rid: str, valid: ValidRequest, received: float,
                        aborted: asyncio.Event, time_remaining: float | None):
        seed = valid.sampling.seed if valid.sampling.seed is not None else self._rng.getrandbits(31)
        progress = _Progress(received, len(valid.prompt_ids))
        stream = (TextStream(self.tokenizer, valid.prompt_ids, valid.sampling.stop)
                  if self.tokenizer is not None else None)
        deadline = self._deadline(time_remaining)
        attempt, avoid = 0, set()  # workers that failed this request: others first next time
        while True:
            try:
                async for out in self._attempt(rid, attempt, valid, seed, progress, stream,
                                               aborted, deadline, avoid):
                    yield out
                return
            except WorkerLost as e:
                attempt += 1
                avoid.update(e.workers)
                progress.migrations += 1
                if progress.migrations > self.serving.max_migrations:
                    raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"gave up after "
                                        f"{self.serving.max_migrations} migrations "
                                        f"(serving.max_migrations): {e}") from None
                log.warning("request %s moves to another worker (%d generated tokens kept): %s",
                            rid, len(progress.generated), e)

    def _deadline(self, remaining: float | None) -> float:
        """When a queued request gives up waiting for pages: the call's deadline, else
        serving.queue_timeout_s from now."""
        limit = self.serving.queue_timeout_s
        return time.monotonic() + (min(remaining, limit) if remaining is not None else limit)

    async def _attempt(self, rid: str, n: int, valid: ValidRequest, seed: int,
                       progress: _Progress, stream: TextStream | None, aborted: asyncio.Event,
                       deadline: float, avoid: set[WorkerHandle]):
        """One pass through a decode (and a prefill) worker; raises WorkerLost to migrate."""
        done = len(progress.generated)
        if done >= valid.sampling.max_tokens:  # every token arrived; only the worker's end did not
            yield self._complete(rid, "length", progress)
            return
        sampling = dataclasses.replace(valid.sampling, max_tokens=valid.sampling.max_tokens - done)
        request = Request(rid if n == 0 else f"{rid}@{n}", valid.prompt_ids + tuple(progress.generated),
                          sampling, sample_offset=done)
        engine_request = engine_request_to_pb(request, seed, secrets.token_urlsafe(16))
        events: asyncio.Queue = asyncio.Queue()
        calls, tasks, unwatch = [], [], []

        def pump(tag: str, worker: WorkerHandle, call) -> None:
            async def run():
                try:
                    async for ev in call:
                        events.put_nowait((tag, ev))
                    events.put_nowait((tag, None))
                except grpc.aio.AioRpcError as e:
                    events.put_nowait((tag, e))
            calls.append(call)
            tasks.append(asyncio.create_task(run()))
            unwatch.append(self.pool.watch(worker, lambda why: events.put_nowait(("lost", why))))

        abort_task = asyncio.create_task(aborted.wait())
        abort_task.add_done_callback(lambda _: events.put_nowait(("abort", None)))
        prefill_worker = None
        workers: dict[str, WorkerHandle] = {}
        try:
            progress.worker_queue_from = time.monotonic()
            local = self.local_prefill or not any(w.serving for w in self.pool.prefill)
            decode_worker, decode_call = await self._reserve(
                engine_request, len(request.prompt_ids), local, deadline, aborted, avoid,
                wait_for_workers=n > 0)
            if decode_worker is None:  # aborted while queued
                yield self._complete(rid, "abort", progress)
                return
            local = decode_call.local  # conditional disaggregation may have chosen it
            workers["decode"] = decode_worker
            pump("decode", decode_worker, decode_call)
            if not local:
                page_size = self.deployment.kv.page_size
                prefill_worker = (self.pool.choose_prefill(request.prompt_ids, page_size, avoid)
                                  or self.pool.choose_prefill(request.prompt_ids, page_size))
                if prefill_worker is None:
                    raise WorkerLost(None, "no prefill worker is serving")
                workers["prefill"] = prefill_worker
                prefill_worker.in_flight += 1
                progress.worker_queue_from = time.monotonic()
                pump("prefill", prefill_worker, prefill_worker.stub.Prefill(worker_pb2.PrefillRequest(
                    request=engine_request,
                    kv_target=decode_call.data_address or decode_worker.address,
                    kv_target_name=decode_worker.name, kv_skip_tokens=decode_call.cached_tokens),
                    metadata=internal_metadata()))
            held: list[worker_pb2.Tokens] = []  # decode tokens that overtook the first token
            first_seen = False
            while True:
                tag, ev = await events.get()
                if tag == "abort":
                    yield self._complete(rid, "abort", progress)
                    return
                if tag == "lost":
                    lost = WorkerLost(None, ev)
                    lost.workers = {w for w in workers.values() if not w.serving}
                    raise lost
                if isinstance(ev, grpc.aio.AioRpcError):
                    self._failed(workers[tag], ev)
                if ev is None:
                    if tag == "decode":
                        raise WorkerLost(decode_worker, f"{decode_worker.name} ended the stream early")
                    continue
                kind, ready = ev.WhichOneof("event"), []
                if kind == "first_token":
                    prefill_worker.in_flight -= 1
                    first_seen = True
                    ready = [self._first_token(ev.first_token, progress, valid), *held]
                    held.clear()
                elif kind == "prefilled":
                    self._prefilled(ev.prefilled, progress)
                elif kind == "kv_received":
                    progress.kv_in_at = time.monotonic()
                elif kind == "tokens":
                    waiting = not local and not first_seen
                    (held if waiting else ready).append(ev.tokens)
                for tokens in ready:
                    for out in self._emit(rid, tokens, progress, stream, valid):
                        if out.HasField("complete"):  # the conversation's blocks stay there
                            decode_worker.remember_blocks(prefix_hashes(
                                valid.prompt_ids + tuple(progress.generated),
                                self.deployment.kv.page_size))
                        yield out
                        if out.HasField("complete"):
                            return
        finally:
            if prefill_worker is not None and not first_seen:
                prefill_worker.in_flight -= 1
            abort_task.cancel()
            for fn in unwatch:
                fn()
            for call in calls:
                call.cancel()
            for task in tasks:
                task.cancel()

    def _failed(self, worker: WorkerHandle, e: grpc.aio.AioRpcError) -> None:
        """A worker call ended with an error: migrate, or fail the request with its status."""
        if e.code() in MIGRATE:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.pool.probe_soon(worker)
            raise WorkerLost(worker, f"{worker.name}: {e.code().name}: {e.details()}")
        raise RequestFailed(e.code(), f"{worker.name}: {e.details()}")

    async def _reserve(self, engine_request: worker_pb2.EngineRequest, prompt_len: int,
                       local: bool, deadline: float, aborted: asyncio.Event,
                       avoid: set[WorkerHandle] = frozenset(), *,
                       wait_for_workers: bool = False):
        """(decode worker, its Decode call with the Reserved event read) once a worker reserved
        pages; (None, None) if aborted meanwhile. Requests that find every pool full wait in
        FCFS order until pages free up or `deadline`; RESOURCE_EXHAUSTED when the queue is full
        or the deadline passes. When no decode worker serves, a new request fails at once
        (UNAVAILABLE: the router reports NOT_SERVING too), but one that is moving from a failed
        worker (`wait_for_workers`) waits the same way for a worker to come back (restarted)."""
        page_size = self.deployment.kv.page_size
        pages = -(-(prompt_len + 1) // page_size)
        needed = -(-(prompt_len + engine_request.sampling.max_tokens) // page_size)
        request = worker_pb2.DecodeRequest(request=engine_request, local_prefill=local)
        ticket = none_serving = None
        # hashed once per request: the worker that likely holds the prompt's leading blocks
        # (an earlier turn of the conversation ended there) reuses them, whoever prefills
        prefix = prefix_hashes(engine_request.prompt_ids, page_size)
        try:
            while True:
                if ticket is None or self.queue[0] is ticket:
                    try:
                        found = await self._try_reserve(request, pages, needed, avoid, prefix)
                        if found is None and avoid:  # only workers that failed it have room
                            found = await self._try_reserve(request, pages, needed, set(),
                                                            prefix)
                    except _NoneServing as e:
                        if not wait_for_workers or time.monotonic() >= deadline:
                            raise
                        none_serving, found = e, None
                    else:
                        none_serving = None
                    if found is not None:
                        return found
                if aborted.is_set():
                    return None, None
                if ticket is None:
                    if len(self.queue) >= self.serving.max_queued:
                        raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"every decode "
                                            f"worker's KV pool is full and {len(self.queue)} "
                                            f"requests already wait (serving.max_queued); retry "
                                            f"later")
                    ticket = object()
                    self.queue.append(ticket)
                left = deadline - time.monotonic()
                if left <= 0 and none_serving is not None:
                    raise none_serving
                if left <= 0:
                    raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "waited for free KV "
                                        "pages until the request's deadline (or "
                                        "serving.queue_timeout_s); every decode pool stayed full")
                await self.pool.changed(min(left, 0.25))
        finally:
            if ticket is not None:
                self.queue.remove(ticket)
                self.pool.notify()  # the next in line may try

    async def _try_reserve(self, request: worker_pb2.DecodeRequest, pages: int, needed: int,
                           exclude: set[WorkerHandle], prefix: list[bytes] | None = None):
        """Ask each serving decode worker in turn (the emptiest first; with `prefix`, the one
        likely holding those blocks first) to reserve pages."""
        order = self.pool.decode_order(needed if not request.local_prefill else pages, exclude,
                                       prefix)
        if not order and not any(w.serving for w in self.pool.decode):
            states = ", ".join(f"{w.name} is {w.state}" for w in self.pool.decode)
            raise _NoneServing(grpc.StatusCode.UNAVAILABLE, f"no decode worker is serving "
                               f"({states}); retry shortly")
        if not order and needed > self.pool.largest_decode_pool():
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: the "
                                f"request needs {needed} pages of KV but the largest decode pool "
                                f"holds {self.pool.largest_decode_pool()}")
        for worker in order:
            placed = self._local_if_short(request, worker, prefix)
            sent = worker.record_sent(pages)
            call = worker.stub.Decode(placed, metadata=internal_metadata())
            try:  # a frozen worker must not hold the request: wait at most the liveness deadline
                first = await asyncio.wait_for(call.read(), self.pool.liveness_timeout_s)
            except TimeoutError:
                worker.forget_sent(sent)
                call.cancel()
                self.pool.probe_soon(worker)
                continue
            except grpc.aio.AioRpcError as e:
                worker.forget_sent(sent)
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    continue
                if e.code() in MIGRATE:  # not started: try the next worker, no migration
                    self.pool.probe_soon(worker)
                    continue
                raise RequestFailed(e.code(), f"{worker.name}: {e.details()}") from None
            if first is grpc.aio.EOF or not first.HasField("reserved"):
                worker.forget_sent(sent)
                call.cancel()
                continue
            return worker, _Rest(call, first.reserved, placed.local_prefill)
        return None

    def _local_if_short(self, request: worker_pb2.DecodeRequest, worker: WorkerHandle,
                        prefix: list[bytes] | None) -> worker_pb2.DecodeRequest:
        """Conditional disaggregation: `request` as a local prefill on `worker` when that
        worker likely holds the prompt's leading blocks (an earlier turn of the conversation
        ended there) and the rest is at most serving.local_prefill_max_tokens: a short new
        turn costs less there than a hand-off. Else unchanged (a prompt nobody holds goes to
        a prefill worker, however short)."""
        limit = self.serving.local_prefill_max_tokens
        if request.local_prefill or limit <= 0:
            return request
        held = worker.cached_blocks(prefix or []) * self.deployment.kv.page_size
        if not held or len(request.request.prompt_ids) - held > limit:
            return request
        local = worker_pb2.DecodeRequest()
        local.CopyFrom(request)
        local.local_prefill = True
        return local

    @staticmethod
    def _first_token(ft: worker_pb2.FirstToken, progress: _Progress,
                     valid: ValidRequest) -> worker_pb2.Tokens:
        """The prefill worker's first token as the decode stream's Tokens, timings recorded."""
        Router._prefilled(ft, progress)
        tokens = worker_pb2.Tokens(token_ids=[ft.token_id], finish_reason=ft.finish_reason)
        if valid.sampling.logprobs:
            tokens.logprobs.append(ft.logprob)
        if ft.finish_reason == "stop":  # EOS or a stop token: the first token is the match
            tokens.matched_token_id = ft.token_id
        return tokens

    @staticmethod
    def _prefilled(p, progress: _Progress) -> None:
        if progress.first_token_at is not None:  # a later attempt's prefill: keep the first's
            return
        progress.cached_tokens, progress.prefill_s = p.cached_tokens, p.prefill_s
        progress.queue_s = progress.worker_queue_from - progress.received + p.queue_s

    def _emit(self, rid: str, tokens: worker_pb2.Tokens, progress: _Progress,
              stream: TextStream | None, valid: ValidRequest):
        """Chunk (and Complete) responses for new tokens, after detokenizing and stop strings."""
        now = time.monotonic()
        if progress.first_token_at is None and tokens.token_ids:
            progress.first_token_at = now
        elif tokens.token_ids and progress.last_chunk_at is not None:
            gap = (now - progress.last_chunk_at) / len(tokens.token_ids)
            for _ in tokens.token_ids:
                self.metrics.itl.observe(gap)
        if tokens.token_ids:
            progress.last_chunk_at = now
        ids, logprobs = list(tokens.token_ids), list(tokens.logprobs)
        progress.generated.extend(ids)
        finish = tokens.finish_reason or None
        text = ""
        if stream is not None:
            before = stream.num_tokens
            text = stream.push(ids, final=finish is not None)
            if stream.stopped:
                used = stream.num_tokens - before
                ids, logprobs, finish = ids[:used], logprobs[:used], "stop"
        progress.completion_tokens += len(ids)
        if ids or text:
            chunk = generation_pb2.Chunk(token_ids=ids, text=text if valid.text else "",
                                         logprobs=logprobs)
            yield generation_pb2.GenerateResponse(request_id=rid, chunk=chunk)
        if finish is not None:
            matched_str = stream.matched_stop if (stream is not None and stream.stopped) else None
            matched_id = tokens.matched_token_id if tokens.HasField("matched_token_id") else None
            yield self._complete(rid, finish, progress, matched_str=matched_str,
                                 matched_id=None if matched_str else matched_id)

    def _complete(self, rid: str, reason: str, progress: _Progress, *, matched_str: str | None = None,
                  matched_id: int | None = None) -> generation_pb2.GenerateResponse:
        self._record(reason, progress)
        complete = generation_pb2.Complete(
            finish_reason=reason, timings=progress.timings(), migrations=progress.migrations,
            usage=generation_pb2.Usage(prompt_tokens=progress.prompt_tokens,
                                       completion_tokens=progress.completion_tokens,
                                       cached_tokens=progress.cached_tokens))
        if matched_str is not None:
            complete.matched_stop_str = matched_str
        elif matched_id is not None:
            complete.matched_token_id = matched_id
        return generation_pb2.GenerateResponse(request_id=rid, complete=complete)

    def _record(self, reason: str, progress: _Progress) -> None:
        m, now = self.metrics, time.monotonic()
        m.success.labels(reason).inc()
        m.e2e.observe(now - progress.received)
        m.queue.observe(progress.queue_s)
        m.migrations.inc(progress.migrations)
        m.prompt_tokens.inc(progress.prompt_tokens)
        m.generation_tokens.inc(progress.completion_tokens)
        if progress.first_token_at is not None:
            m.ttft.observe(progress.first_token_at - progress.received)
            if progress.completion_tokens > 1:
                m.tpot.observe((now - progress.first_token_at) / (progress.completion_tokens - 1))

    # -- drain -----------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> int:
        """Refuse new requests (UNAVAILABLE with a retry hint) and wait up to `timeout` for
        the running ones to finish; returns how many were still running."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self.inflight)

    # -- the other calls -------------------------------------------------------------------------
    async def Abort(self, request, context):
        aborted = []
        for rid in request.request_ids:
            event = self.inflight.get(rid)
            if event is not None and not event.is_set():
                event.set()
                aborted.append(rid)
        return generation_pb2.AbortResponse(aborted=aborted)

    async def Tokenize(self, request, context):
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this model has no tokenizer.json; clients must send token ids")
        from jaxpd.request_check import prompt_text

        loop = asyncio.get_running_loop()
        try:
            text = prompt_text(request.text, self.limits(), self.tokenizer) if request.text else ""
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"text: {e.reason}")
        ids = await loop.run_in_executor(self._checker, self.tokenizer.encode, text) if text else []
        return generation_pb2.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context):
        cfg = self.config
        info = next((w.info for w in self.pool.workers if w.info is not None), None)
        return generation_pb2.ModelInfo(
            model=self.model_name, architecture="LlamaForCausalLM", vocab_size=cfg.vocab_size,
            max_context=cfg.max_position_embeddings, dtype=info.dtype if info else cfg.dtype,
            eos_token_ids=list(cfg.eos_token_ids), num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            has_tokenizer=self.tokenizer is not None,
            fingerprint=info.model_fingerprint if info else "")

    async def GetServerInfo(self, request, context):
        return generation_pb2.ServerInfo(
            version=__version__, mode="colocated" if self.local_prefill else "disaggregated",
            kv_transport="none" if self.local_prefill else self.serving.transport,
            router_address=self.address, metrics_url=self.metrics_url,
            workers=[w.info_with_state() for w in self.pool.workers])

    async def GetLoads(self, request, context):
        """Fresh reports (each worker asked now, for at most a second); a worker that does not
        answer shows its state with zeros, never as an idle worker."""
        await asyncio.gather(*(self.pool.probe(w, timeout=1.0) for w in self.pool.workers))
        return generation_pb2.Loads(workers=[w.load_with_state() for w in self.pool.workers])


class _Rest:
    """A Decode call whose first message (Reserved) was already read: iterate the rest."""

    def __init__(self, call, reserved: worker_pb2.Reserved, local: bool):
        self._call = call
        self.data_address = reserved.data_address  # where KV goes when not over gRPC (tcp://)
        self.cached_tokens = reserved.cached_tokens  # prompt KV the worker holds already
        self.local = local  # the worker prefills the prompt itself

    def cancel(self) -> bool:
        return self._call.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        ev = await self._call.read()
        if ev is grpc.aio.EOF:
            raise StopAsyncIteration
        return ev
