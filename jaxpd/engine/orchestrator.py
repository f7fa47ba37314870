"""Drives a prefill engine and a decode engine: colocated or disaggregated.

Colocated (the baseline): both engines share one mesh and one page pool; each iteration runs one
batch of prefill chunks and then one decode step, so long prompts are chunked in between decode
steps rather than stalling them. Disaggregated: the engines own different meshes and pools; a
finished prefill reserves pages on the decode side, its KV moves through a `KVTransport`, and
its prefill pages are released (their full blocks stay in the prefill side's prefix cache).

Every path that ends a sequence (finish, abort, preemption) releases its pages.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
from typing import Callable

import jax

from jaxpd.engine.decode import CollectFirst, DecodeEngine
from jaxpd.engine.prefill import PrefillEngine
from jaxpd.engine.programs import StepShape
from jaxpd.engine.request import FinishReason, Request, RequestOutput, RequestStatus, Sequence
from jaxpd.engine.runner import ModelRunner
from jaxpd.errors import CapacityError, ConfigError
from jaxpd.kv.manager import KVCacheManager
from jaxpd.request_check import DuplicateRequest, Limits, RawRequest, check_request
from jaxpd.transfer.base import KVTransport


class Engine:
    def __init__(self, prefill: PrefillEngine, decode: DecodeEngine,
                 transport: KVTransport | None = None, *, seed: int = 0):
        self.prefill, self.decode = prefill, decode
        self.colocated = prefill.manager is decode.manager
        if not self.colocated and transport is None:
            raise ConfigError("a disaggregated engine (two page pools) needs a KV transport")
        self.transport = transport
        self._rng = random.Random(seed)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.handoff: list[Sequence] = []  # prefilled, waiting for decode-side pages
        self.running: list[Sequence] = []
        self.receiving: dict[str, Sequence] = {}  # decode pages reserved, KV coming from elsewhere
        # A prefill worker's engine (`send_prefilled`): prefilled sequences keep their pages here
        # until their KV reached the decode worker (`release_sent`), instead of decoding.
        self.send_prefilled = False
        self.sending: dict[str, Sequence] = {}
        self._ids: set[str] = set()
        self.num_preemptions = 0
        # called with a decode call on the device, before its tokens are fetched, with a
        # function that blocks until the call is done: host work that touches no device state
        # can run meanwhile (a serving worker answers KV reservations there, so a new request
        # does not wait out the call in flight)
        self.while_decoding: Callable[[Callable[[], None]], None] | None = None

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self._validate(request)
        seed = request.sampling.seed if request.sampling.seed is not None else self._rng.getrandbits(31)
        self._ids.add(request.id)
        self.waiting.append(Sequence(request, seed))

    def kv_capacity(self) -> int:
        """The most tokens of KV one request may hold: the smaller page pool's size."""
        managers = {id(m): m for m in (self.prefill.manager, self.decode.manager)}.values()
        return min((m.allocator.num_blocks - 1) * m.page_size for m in managers)

    def limits(self) -> Limits:
        """What `add_request` checks requests against (for front ends that check first)."""
        return Limits.of(self.prefill.runner.config, self.kv_capacity())

    def _validate(self, request: Request) -> None:
        """The one request check (`jaxpd.request_check`), as every front end runs it; stop
        strings are matched by whoever detokenizes, so they are not the engine's to check. A
        prefill worker's engine only holds the prompt."""
        if request.id in self._ids:
            raise DuplicateRequest("request_id", f"{request.id!r} is already in flight; use a "
                                                 f"new id")
        sampling = dataclasses.replace(request.sampling, stop=())
        limits = self.limits()
        if self.send_prefilled:
            limits = dataclasses.replace(limits, kv_capacity=None)
            if len(request.prompt_ids) + 1 > self.kv_capacity():
                raise CapacityError(f"request {request.id!r}: a {len(request.prompt_ids)}-token "
                                    f"prompt does not fit this prefill worker's pool "
                                    f"({self.kv_capacity()} tokens)", request_id=request.id)
        check_request(RawRequest.of(request.id, request.prompt_ids, sampling), limits, None)

    # -- requests prefilled elsewhere (a decode worker fed over a KV transport) ----------------
    def reserve_remote(self, request: Request, seed: int) -> Sequence | None:
        """Decode-side pages for a request whose prompt KV another engine computes; None when
        they do not fit now. Blocks of the prompt in this pool's prefix cache are reused
        (`seq.pages.num_cached` tokens: their KV need not come). The caller writes the rest
        of the KV into `seq.pages`, then `start_remote`."""
        self._validate(request)
        pages = self.decode.manager.allocate_received(request.prompt_ids)
        if pages is None:
            return None
        seq = Sequence(request, seed, pages=pages, status=RequestStatus.WAITING_FOR_REMOTE_KV)
        seq.prompt_tokens_cached = pages.num_cached
        self._ids.add(request.id)
        self.receiving[request.id] = seq
        return seq

    def start_remote(self, request_id: str, first_token: int, logprob: float) -> RequestOutput:
        """The prompt's KV is in the pages: record the first token; the sequence joins decoding."""
        seq = self.receiving.pop(request_id)
        seq.num_computed = seq.prompt_len
        seq.append(first_token, logprob, self.decode.eos_ids)
        if seq.finish_reason is None:
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
        else:
            self._finish(seq, self.decode.manager)
        return _output(seq)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> RequestOutput | None:
        """End a request wherever it is (freeing its pages); None if it is not in flight.

        `reason="stop"` is for callers that matched a stop string on the text.
        """
        if request_id in self.receiving:
            seq = self.receiving.pop(request_id)
            seq.finish_reason = reason
            self._finish(seq, self.decode.manager)
            return _output(seq)
        if request_id in self.sending:
            seq = self.sending.pop(request_id)
            seq.finish_reason = reason
            self._finish(seq, self.prefill.manager)
            return _output(seq)
        for queue in (self.waiting, self.prefilling, self.handoff, self.running):
            for seq in queue:
                if seq.id == request_id:
                    queue.remove(seq)
                    seq.finish_reason = reason
                    self._finish(seq, self._manager_of(seq, queue))
                    return _output(seq)
        return None

    def release_sent(self, request_id: str) -> None:
        """A prefill worker's request whose KV the decode worker holds: free its pages (full
        blocks stay in the prefix cache). The request is finished here."""
        seq = self.sending.pop(request_id, None)
        if seq is not None:
            self._finish(seq, self.prefill.manager)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.handoff or self.running
                    or self.receiving or self.sending)

    def has_work(self) -> bool:
        """Whether `step` would compute anything (sequences awaiting remote KV need no step)."""
        return bool(self.waiting or self.prefilling or self.handoff or self.running)

    # -- one iteration -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit, prefill one chunk batch, hand off, decode one dispatch (up to the decode
        engine's `steps_per_dispatch` tokens each); one output per changed sequence (a
        sequence can both finish its prefill and decode in one step).

        With the decode engine's `overlap`, the decode call goes first and stays in flight
        while the prefill runs (on its own mesh when disaggregated), and the step reports the
        previous decode call's tokens: outputs trail the device by one call."""
        changed: dict[str, Sequence] = {}
        self._admit()
        if self.decode.overlap:
            started = self._dispatch_decode(changed)
            self._prefill(changed)
            self._hand_off()
            self._device_busy(started)
            self._collect_decode(changed, keep=1 if started else 0)
        else:
            self._prefill(changed)
            self._hand_off()
            self._device_busy(self._dispatch_decode(changed))
            self._collect_decode(changed, keep=0)
        return [_output(s) for s in changed.values()]

    def _device_busy(self, started: bool) -> None:
        # nothing pending: a single-step call, already fetched (nothing to wait for)
        if not started or self.while_decoding is None or not self.decode.pending:
            return
        fetched_next = self.decode.pending[0]  # what `collect` waits for next
        self.while_decoding(lambda: jax.block_until_ready(fetched_next.outputs))

    def _prefill(self, changed: dict[str, Sequence]) -> None:
        if not self.prefilling:
            return
        for seq in self.prefill.step(self.prefilling):
            self.prefilling.remove(seq)
            changed[seq.id] = seq
            if seq.finish_reason is not None:
                self._finish(seq, self.prefill.manager)
            elif self.send_prefilled:
                seq.status = RequestStatus.SENDING_KV
                self.sending[seq.id] = seq
            else:
                self.handoff.append(seq)

    def _dispatch_decode(self, changed: dict[str, Sequence]) -> bool:
        """Reserve pages and start a decode call; whether one was started."""
        if not self.running:
            return False
        try:
            batch, preempted = self.decode.reserve(self.running)
        except CollectFirst:  # a preemption must not free pages a call in flight still fills
            self._collect_decode(changed, keep=0)
            if not self.running:
                return False
            batch, preempted = self.decode.reserve(self.running)
        for victim in preempted:  # newest first: re-queue so the oldest is admitted first
            self.running.remove(victim)
            victim.status = RequestStatus.PREEMPTED
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
        # prompts waiting for their prefill: one decode step per iteration, so each prefill
        # chunk batch is followed by one step rather than k and the decode batch fills up at
        # the pace of single-step scheduling (multi-step pays once the batch is steady)
        pending_prompts = bool(self.waiting or self.prefilling or self.handoff)
        return self.decode.dispatch(batch, max_steps=1 if pending_prompts else None)

    def _collect_decode(self, changed: dict[str, Sequence], *, keep: int) -> None:
        for seq in self.decode.collect(keep=keep if self.running else 0):
            changed[seq.id] = seq
            if seq.finish_reason is not None:
                self.running.remove(seq)
                self._finish(seq, self.decode.manager)
        if not self.running:
            self.decode.discard_pending()

    def shapes(self) -> list[tuple[ModelRunner, list[StepShape]]]:
        """Each runner with the programs it may use, likeliest first (one runner colocated:
        prefill and decode shapes interleaved, so the first few cover a first request)."""
        prefill, decode = self.prefill.shapes(), self.decode.shapes()
        if self.colocated:
            merged = [s for pair in itertools.zip_longest(prefill, decode) for s in pair if s]
            return [(self.prefill.runner, merged)]
        return [(self.prefill.runner, prefill), (self.decode.runner, decode)]

    def first_shapes(self) -> list[tuple[ModelRunner, list[StepShape]]]:
        """Each runner with the programs a first request needs (batch 1: the smallest prefill
        chunk, one decode row)."""
        if self.colocated:
            return [(self.prefill.runner, [self.prefill.shapes()[0], self.decode.shapes()[0]])]
        return [(self.prefill.runner, self.prefill.shapes()[:1]),
                (self.decode.runner, self.decode.shapes()[:1])]

    def prepare_programs(self, mode: str) -> int:
        """Compile step programs ahead of the work, by `mode` (`jaxpd generate --precompile`):
        `off` compiles each shape when a step first wants it, on the request path; `first`
        compiles the first-request programs and fits every step to them; `background` compiles
        a shape on the request path only when no ready program can run the step, and every
        other shape a step wants on a background thread, running the step padded up to or
        trimmed to ready programs meanwhile; `all` compiles every shape now. Returns how many
        programs were compiled now."""
        if mode == "off":
            return 0
        if mode == "all":
            return self.precompile()
        new = 0
        for runner, first in self.first_shapes():
            runner.compile_on_demand = False
            if mode == "first":
                new += runner.programs.compile_all(first)
            else:
                runner.programs.compile_in_background(on_demand=True)
        return new

    def stop_compiling(self, timeout: float | None = 30.0) -> None:
        """Stop background compilation and wait for the program being compiled (a process
        must not exit while XLA compiles on another thread)."""
        for runner, _ in self.shapes():
            runner.programs.stop(timeout)

    def precompile(self) -> int:
        """Compile every program either engine can use, so no request pays a compilation
        (with the persistent compilation cache, a restart loads them instead); from then on a
        step never compiles (`ModelRunner.compile_on_demand` off). Returns how many were new."""
        new = 0
        for runner, shapes in self.shapes():
            new += runner.programs.compile_all(shapes)
            runner.compile_on_demand = False
        return new

    def run_to_completion(self, requests: list[Request]) -> dict[str, RequestOutput]:
        for r in requests:
            self.add_request(r)
        final: dict[str, RequestOutput] = {}
        while self.has_work():
            for out in self.step():
                if out.finished:
                    final[out.id] = out
        return final

    # -- internals -----------------------------------------------------------------------------
    def _admit(self) -> None:
        # Colocated, admitting a prompt must not take the pages running sequences grow into:
        # keep a watermark of one page per sequence in flight, so preemption stays rare.
        while self.waiting:
            seq = self.waiting[0]
            in_flight = len(self.running) + len(self.prefilling) + len(self.handoff)
            keep_free = in_flight if self.colocated else 0
            if not self.prefill.admit(seq, keep_free=keep_free):
                if not (self.prefilling or self.handoff or self.running or self.receiving
                        or self.sending):
                    raise CapacityError(f"request {seq.id!r} ({len(seq.tokens)} tokens) does not fit in the "
                                        f"prefill page pool even with nothing else running; raise "
                                        f"kv.num_pages or shorten the prompt", request_id=seq.id)
                break
            self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.prefilling.append(seq)

    def _hand_off(self) -> None:
        still = []
        for seq in self.handoff:
            if self.colocated:
                self.running.append(seq)
                continue
            dst = self.decode.manager.allocate(len(seq.tokens))
            if dst is None:
                still.append(seq)
                continue
            n = self.prefill.manager.layout.pages_for(seq.num_computed)
            self.transport.transfer(self.prefill.manager, seq.pages.pages[:n],
                                    self.decode.manager, dst.pages[:n])
            self.prefill.manager.release(seq.pages)
            seq.pages = dst
            self.running.append(seq)
        self.handoff = still

    def _manager_of(self, seq: Sequence, queue) -> KVCacheManager:
        """Sequences hold decode-side pages once running, prefill-side pages before."""
        return self.decode.manager if queue is self.running else self.prefill.manager

    def _release(self, seq: Sequence, manager) -> None:
        if seq.pages is not None:
            manager.release(seq.pages)
            seq.pages = None

    def _finish(self, seq: Sequence, manager) -> None:
        # A conversation's next turn repeats this one (prompt + reply): its full blocks enter
        # the prefix cache, so that turn prefills only what is new. (Not after a sliding
        # window dropped leading pages: those blocks are gone.)
        if seq.pages is not None and not seq.pages.num_dropped:
            manager.commit_full_blocks(seq.pages, seq.tokens, seq.num_computed)
        self._release(seq, manager)
        seq.status = RequestStatus.FINISHED
        self._ids.discard(seq.id)


def _output(seq: Sequence) -> RequestOutput:
    return RequestOutput(id=seq.id, prompt_ids=seq.request.prompt_ids,
                         token_ids=tuple(seq.output_ids),
                         logprobs=tuple(seq.logprobs) if seq.request.sampling.logprobs else None,
                         finish_reason=seq.finish_reason,
                         prompt_tokens_cached=seq.prompt_tokens_cached,
                         matched_token_id=seq.matched_token_id)
