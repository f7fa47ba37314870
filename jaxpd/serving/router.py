"""The router: jaxpd's public Generation service, in front of prefill and decode workers.

For each request it validates and tokenizes, chooses a decode worker first (the most free KV
pages; the worker's own reservation is the final word), then a prefill worker (the fewest
requests in flight, preferring one whose prefix cache likely holds the prompt's first blocks),
and merges the two workers' streams into one: the first token from prefill, the rest from
decode. Detokenization and stop strings happen here, in the same `TextStream` that `jaxpd
generate` and batch mode use. Whatever ends the call (completion, a stop string, `Abort`, the
client cancelling, its deadline) cancels the worker calls, which frees the pages on both sides.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
import uuid
from typing import Awaitable, Callable

import grpc

from jaxpd import __version__
from jaxpd.config import DeploymentConfig
from jaxpd.engine.output import TextStream
from jaxpd.engine.request import Request
from jaxpd.kv.allocator import block_hashes
from jaxpd.model.config import ModelConfig
from jaxpd.serving.convert import engine_request_to_pb
from jaxpd.serving.grpc_server import new_channel
from jaxpd.serving.validate import InvalidRequest, ValidRequest, validate
from jaxpd.tokenizer import Tokenizer
from jaxpd.v1 import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

PREFIX_BLOCKS_TRACKED = 8192  # first-block hashes remembered per prefill worker
LOAD_POLL_S = 0.5


@dataclasses.dataclass
class WorkerHandle:
    role: str  # prefill | decode | colocated
    replica: int
    address: str
    stub: object
    info: generation_pb2.WorkerInfo | None = None
    load: generation_pb2.WorkerLoad | None = None
    in_flight: int = 0  # requests this router sent and the worker has not finished prefilling
    recent_blocks: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.replica} ({self.address})"


def make_workers(role: str, addresses: list[str]) -> list[WorkerHandle]:
    stub = worker_pb2_grpc.PrefillWorkerStub if role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
    return [WorkerHandle(role, i, a, stub(new_channel(a))) for i, a in enumerate(addresses)]


class RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class _Progress:
    """One request's state in the router: timings and what was streamed so far."""

    received: float
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    first_token_at: float | None = None
    kv_in_at: float | None = None
    worker_queue_from: float = 0.0

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
                 tokenizer: Tokenizer | None, model_name: str, *, prefill: list[WorkerHandle],
                 decode: list[WorkerHandle], address: str = ""):
        self.deployment, self.config, self.tokenizer = deployment, model_config, tokenizer
        self.model_name, self.address = model_name, address
        self.prefill_workers, self.decode_workers = prefill, decode
        self.local_prefill = not prefill  # colocated: decode workers prefill themselves
        self.inflight: dict[str, asyncio.Event] = {}
        self._rng = random.Random()
        self._poller: asyncio.Task | None = None
        self.on_health: Callable[[bool], Awaitable[None]] | None = None  # set by the server
        self.healthy = True

    # -- start-up --------------------------------------------------------------------------------
    async def connect(self, timeout: float) -> None:
        """Wait until every worker answers, and check they all serve the same model."""
        deadline = time.monotonic() + timeout
        for w in [*self.prefill_workers, *self.decode_workers]:
            while True:
                try:
                    w.info = await w.stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5,
                                                        wait_for_ready=True)
                    break
                except grpc.aio.AioRpcError as e:
                    if time.monotonic() > deadline:
                        raise RequestFailed(grpc.StatusCode.UNAVAILABLE,
                                            f"worker {w.name} did not answer: {e.details()}") from None
                    await asyncio.sleep(0.2)
        prints = {w.info.model_fingerprint for w in self._workers()}
        if len(prints) > 1:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                "the workers serve different models (fingerprints "
                                f"{sorted(p[:12] for p in prints)}); give them the same model section")
        await self._poll_loads()
        self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    def _workers(self) -> list[WorkerHandle]:
        return [*self.prefill_workers, *self.decode_workers]

    async def _poll_loads(self) -> list[generation_pb2.WorkerLoad]:
        async def one(w: WorkerHandle):
            try:
                w.load = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                w.load = None
            return w.load or generation_pb2.WorkerLoad(role=w.role, replica=w.replica, address=w.address)
        return list(await asyncio.gather(*(one(w) for w in self._workers())))

    async def _poll_forever(self) -> None:
        """Keep loads fresh; health is NOT_SERVING while every worker of a role is unreachable."""
        while True:
            await asyncio.sleep(LOAD_POLL_S)
            await self._poll_loads()
            groups = [g for g in (self.prefill_workers, self.decode_workers) if g]
            healthy = all(any(w.load is not None for w in g) for g in groups)
            if healthy != self.healthy:
                self.healthy = healthy
                log.warning("router is %s", "serving again" if healthy else
                            "NOT_SERVING: no worker of a role answers")
                if self.on_health is not None:
                    await self.on_health(healthy)

    # -- choosing workers ------------------------------------------------------------------------
    def _decode_order(self, tokens_needed: int) -> list[WorkerHandle]:
        """Decode workers whose pools fit the request, the most free pages first."""
        page_size = self.deployment.kv.page_size
        pages = -(-tokens_needed // page_size)
        free = lambda w: w.load.kv_pages_free if w.load is not None else 0  # noqa: E731
        fitting = [w for w in self.decode_workers if w.info is None or w.info.kv_pages >= pages]
        return sorted(fitting, key=lambda w: (-free(w), w.in_flight))

    def _choose_prefill(self, prompt: tuple[int, ...]) -> WorkerHandle:
        """The least busy prefill worker, or one nearly as idle that likely holds the prefix."""
        page_size = self.deployment.kv.page_size
        hashes = block_hashes(prompt[:min(len(prompt) - 1, 64 * page_size)], page_size)

        def cached_blocks(w: WorkerHandle) -> int:
            n = 0
            while n < len(hashes) and hashes[n] in w.recent_blocks:
                n += 1
            return n

        least = min(w.in_flight for w in self.prefill_workers)
        near = [w for w in self.prefill_workers if w.in_flight <= least + 2]
        chosen = max(near, key=lambda w: (cached_blocks(w), -w.in_flight))
        for h in hashes:
            chosen.recent_blocks[h] = None
            chosen.recent_blocks.move_to_end(h)
        while len(chosen.recent_blocks) > PREFIX_BLOCKS_TRACKED:
            chosen.recent_blocks.popitem(last=False)
        return chosen

    # -- Generate --------------------------------------------------------------------------------
    async def Generate(self, request: generation_pb2.GenerateRequest, context):
        received = time.monotonic()
        try:
            valid = validate(request, self.config, self.tokenizer)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id or uuid.uuid4().hex
        if rid in self.inflight:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already "
                                "in flight; use a new id (or leave it empty)")
        aborted = asyncio.Event()
        self.inflight[rid] = aborted
        try:
            async for response in self._generate(rid, valid, received, aborted):
                yield response
        except RequestFailed as e:
            await context.abort(e.code, str(e))
        finally:
            self.inflight.pop(rid, None)

    async def _generate(self, rid: str, valid: ValidRequest, received: float, aborted: asyncio.Event):
        seed = valid.sampling.seed if valid.sampling.seed is not None else self._rng.getrandbits(31)
        engine_request = engine_request_to_pb(Request(rid, valid.prompt_ids, valid.sampling), seed)
        progress = _Progress(received, len(valid.prompt_ids))
        stream = (TextStream(self.tokenizer, valid.prompt_ids, valid.sampling.stop)
                  if self.tokenizer is not None else None)
        events: asyncio.Queue = asyncio.Queue()
        calls, tasks = [], []

        def pump(tag: str, call) -> None:
            async def run():
                try:
                    async for ev in call:
                        events.put_nowait((tag, ev))
                    events.put_nowait((tag, None))
                except grpc.aio.AioRpcError as e:
                    events.put_nowait((tag, e))
            calls.append(call)
            tasks.append(asyncio.create_task(run()))

        abort_task = asyncio.create_task(aborted.wait())
        abort_task.add_done_callback(lambda _: events.put_nowait(("abort", None)))
        prefill_worker = None
        try:
            progress.worker_queue_from = time.monotonic()
            decode_worker, decode_call = await self._open_decode(engine_request, valid)
            pump("decode", decode_call)
            if not self.local_prefill:
                prefill_worker = self._choose_prefill(valid.prompt_ids)
                prefill_worker.in_flight += 1
                progress.worker_queue_from = time.monotonic()
                pump("prefill", prefill_worker.stub.Prefill(worker_pb2.PrefillRequest(
                    request=engine_request, kv_target=decode_worker.address)))
            held: list[worker_pb2.Tokens] = []  # decode tokens that overtook the first token
            while True:
                tag, ev = await events.get()
                if tag == "abort":
                    yield self._complete(rid, "abort", progress)
                    return
                if isinstance(ev, grpc.aio.AioRpcError):
                    worker = prefill_worker if tag == "prefill" else decode_worker
                    raise RequestFailed(ev.code(), f"{tag} worker {worker.address}: {ev.details()}")
                if ev is None:
                    if tag == "decode":
                        raise RequestFailed(grpc.StatusCode.INTERNAL, f"decode worker "
                                            f"{decode_worker.address} ended the stream early")
                    continue
                kind, ready = ev.WhichOneof("event"), []
                if kind == "first_token":
                    prefill_worker.in_flight -= 1
                    ready = [self._first_token(ev.first_token, progress, valid), *held]
                    held.clear()
                elif kind == "prefilled":
                    self._prefilled(ev.prefilled, progress)
                elif kind == "kv_received":
                    progress.kv_in_at = time.monotonic()
                elif kind == "tokens":
                    waiting = not self.local_prefill and progress.first_token_at is None
                    (held if waiting else ready).append(ev.tokens)
                for tokens in ready:
                    for out in self._emit(rid, tokens, progress, stream, valid):
                        yield out
                        if out.HasField("complete"):
                            return
        finally:
            if prefill_worker is not None and progress.first_token_at is None:
                prefill_worker.in_flight -= 1
            abort_task.cancel()
            for call in calls:
                call.cancel()
            for task in tasks:
                task.cancel()

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
        progress.cached_tokens, progress.prefill_s = p.cached_tokens, p.prefill_s
        progress.queue_s = progress.worker_queue_from - progress.received + p.queue_s

    async def _open_decode(self, engine_request: worker_pb2.EngineRequest, valid: ValidRequest):
        """A decode worker that reserved pages for the request (or will prefill it itself)."""
        needed = len(valid.prompt_ids) + valid.sampling.max_tokens
        order = self._decode_order(needed)
        if not order:
            biggest = max((w.info.kv_pages for w in self.decode_workers if w.info), default=0)
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.max_tokens: the request "
                                f"needs {needed} tokens of KV but the largest decode pool holds "
                                f"{biggest * self.deployment.kv.page_size}")
        request = worker_pb2.DecodeRequest(request=engine_request, local_prefill=self.local_prefill)
        if self.local_prefill:
            worker = min(order, key=lambda w: w.in_flight)
            worker.in_flight += 1
            call = worker.stub.Decode(request)
            call.add_done_callback(lambda _: setattr(worker, "in_flight", worker.in_flight - 1))
            return worker, call
        last_error = None
        for worker in order:
            call = worker.stub.Decode(request)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    last_error = e
                    continue
                raise RequestFailed(e.code(), f"decode worker {worker.address}: {e.details()}") from None
            if first is grpc.aio.EOF or not first.HasField("reserved"):
                call.cancel()
                raise RequestFailed(grpc.StatusCode.INTERNAL, f"decode worker {worker.address} did "
                                    "not reserve pages")
            return worker, _Rest(call)
        raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "every decode worker's KV pool is "
                            f"full right now; retry later ({last_error.details() if last_error else ''})")

    def _emit(self, rid: str, tokens: worker_pb2.Tokens, progress: _Progress,
              stream: TextStream | None, valid: ValidRequest):
        """Chunk (and Complete) responses for new tokens, after detokenizing and stop strings."""
        if progress.first_token_at is None and tokens.token_ids:
            progress.first_token_at = time.monotonic()
        ids, logprobs = list(tokens.token_ids), list(tokens.logprobs)
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
        complete = generation_pb2.Complete(
            finish_reason=reason, timings=progress.timings(),
            usage=generation_pb2.Usage(prompt_tokens=progress.prompt_tokens,
                                       completion_tokens=progress.completion_tokens,
                                       cached_tokens=progress.cached_tokens))
        if matched_str is not None:
            complete.matched_stop_str = matched_str
        elif matched_id is not None:
            complete.matched_token_id = matched_id
        return generation_pb2.GenerateResponse(request_id=rid, complete=complete)

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
        return generation_pb2.TokenizeResponse(token_ids=self.tokenizer.encode(request.text))

    async def GetModelInfo(self, request, context):
        cfg = self.config
        info = next((w.info for w in self._workers() if w.info is not None), None)
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
            kv_transport="none" if self.local_prefill else self.deployment.serving.transport,
            router_address=self.address, workers=[w.info for w in self._workers() if w.info])

    async def GetLoads(self, request, context):
        return generation_pb2.Loads(workers=await self._poll_loads())


class _Rest:
    """A Decode call whose first message (Reserved) was already read: iterate the rest."""

    def __init__(self, call):
        self._call = call

    def cancel(self) -> bool:
        return self._call.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        ev = await self._call.read()
        if ev is grpc.aio.EOF:
            raise StopAsyncIteration
        return ev
