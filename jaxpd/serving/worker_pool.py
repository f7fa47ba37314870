"""The router's view of its workers: which are serving, how loaded each is, and which to choose.

A worker's load is its last report (`GetLoad`, polled every `poll_s`) plus what this router sent
it since that report was asked for: without the second part, a burst that arrives between two
reports all goes to whichever worker looked emptiest, and a worker's own reservation is then the
only brake. A worker that does not answer within the liveness deadline (killed, frozen with
SIGSTOP, cut off) is `down`: the requests it holds are told (`watch`), so they move elsewhere
instead of waiting on it, and it takes no new ones until it answers as serving again (a
restarted worker comes back with a new pid). A worker that answers but is not serving (starting,
draining) is `starting` and takes no requests either.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Callable

import grpc

from jaxpd.kv.allocator import block_hashes
from jaxpd.serving.grpc_server import internal_metadata, new_channel
from jaxpd.v1 import generation_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

PREFIX_BLOCKS_TRACKED = 8192  # first-block hashes remembered per worker
PREFIX_BLOCKS_HASHED = 512  # a prompt's leading blocks compared (chained: they name the prefix)


def prefix_hashes(tokens, page_size: int) -> list[bytes]:
    """Chained hashes of the leading full blocks of `tokens` whose KV a worker would keep
    (its last token is always recomputed)."""
    return block_hashes(tokens[:min(len(tokens) - 1, PREFIX_BLOCKS_HASHED * page_size)],
                        page_size)
SERVING, STARTING, DRAINING, DOWN = "serving", "starting", "draining", "down"


@dataclasses.dataclass
class _Sent:
    at: float  # when this router sent it
    pages: int


@dataclasses.dataclass(eq=False)
class WorkerHandle:
    role: str  # prefill | decode | colocated
    replica: int
    address: str
    stub: object
    info: generation_pb2.WorkerInfo | None = None
    load: generation_pb2.WorkerLoad | None = None
    state: str = STARTING
    last_answer: float = dataclasses.field(default_factory=time.monotonic)
    sent: list[_Sent] = dataclasses.field(default_factory=list)  # since that report
    in_flight: int = 0  # prefill: requests sent and not yet prefilled
    failed_probes: int = 0  # load reports in a row that did not come
    watchers: set = dataclasses.field(default_factory=set)  # callbacks(reason) when it goes down
    recent_blocks: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
    weight: float = 1.0  # its group's `weight`: requests are shared in proportion to it

    @property
    def name(self) -> str:
        """How messages name it: role and replica (never its internal address)."""
        return f"{self.role}-{self.replica}"

    @property
    def serving(self) -> bool:
        return self.state == SERVING

    def free_pages(self) -> int:
        """Free KV pages as last reported, less what this router reserved since."""
        reported = self.load.kv_pages_free if self.load is not None else 0
        return reported - sum(s.pages for s in self.sent)

    def busy(self) -> int:
        """Requests as last reported plus those sent since."""
        load = self.load
        return (load.running + load.waiting if load is not None else 0) + len(self.sent)

    def cached_blocks(self, hashes: list[bytes]) -> int:
        """How many of a prompt's leading blocks this worker likely holds in its prefix cache
        (it was sent or finished them recently)."""
        n = 0
        while n < len(hashes) and hashes[n] in self.recent_blocks:
            n += 1
        return n

    def remember_blocks(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.recent_blocks[h] = None
            self.recent_blocks.move_to_end(h)
        while len(self.recent_blocks) > PREFIX_BLOCKS_TRACKED:
            self.recent_blocks.popitem(last=False)

    def record_sent(self, pages: int) -> _Sent:
        entry = _Sent(time.monotonic(), pages)
        self.sent.append(entry)
        return entry

    def forget_sent(self, entry: _Sent) -> None:
        """A reservation that did not happen (refused, failed) no longer counts."""
        if entry in self.sent:
            self.sent.remove(entry)

    def report(self, load: generation_pb2.WorkerLoad, asked_at: float) -> None:
        """A load report asked for at `asked_at` covers everything sent before then."""
        self.load, self.last_answer = load, time.monotonic()
        self.sent = [s for s in self.sent if s.at >= asked_at]

    def info_with_state(self) -> generation_pb2.WorkerInfo:
        info = generation_pb2.WorkerInfo()
        if self.info is not None:
            info.CopyFrom(self.info)
        info.role, info.replica, info.address, info.state = self.role, self.replica, self.address, self.state
        return info

    def load_with_state(self) -> generation_pb2.WorkerLoad:
        """Its last report while serving; zeros and its state otherwise (unknown, not idle)."""
        load = generation_pb2.WorkerLoad()
        if self.load is not None and self.serving:
            load.CopyFrom(self.load)
        load.role, load.replica, load.address, load.state = self.role, self.replica, self.address, self.state
        return load


def make_workers(role: str, addresses: list[str],
                 weights: list[float] | None = None) -> list[WorkerHandle]:
    """Handles of `role`'s workers in replica order, with their groups' routing weights."""
    stub = worker_pb2_grpc.PrefillWorkerStub if role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
    weights = weights or [1.0] * len(addresses)
    return [WorkerHandle(role, i, a, stub(new_channel(a)), weight=w)
            for i, (a, w) in enumerate(zip(addresses, weights, strict=True))]


class WorkerPool:
    """Every worker the router knows, polled for load and liveness."""

    def __init__(self, prefill: list[WorkerHandle], decode: list[WorkerHandle], *,
                 liveness_timeout_s: float, poll_s: float = 0.5,
                 on_change: Callable[[], None] | None = None):
        self.prefill, self.decode = prefill, decode
        self.liveness_timeout_s, self.poll_s = liveness_timeout_s, poll_s
        self.on_change = on_change  # called when states change (health)
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._probes: set[asyncio.Task] = set()

    @property
    def workers(self) -> list[WorkerHandle]:
        return [*self.prefill, *self.decode]

    # -- start-up and polling ----------------------------------------------------------------------
    async def connect(self, timeout: float) -> None:
        """Wait until every worker answered once (each must be up when the router starts)."""
        deadline = time.monotonic() + timeout
        for w in self.workers:
            while not await self._refresh_info(w, min(5.0, max(0.1, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise ConnectionError(f"worker {w.name} ({w.address}) did not answer within "
                                          f"{timeout:g} s")
                await asyncio.sleep(0.2)
        await self.poll_once()

    def start(self) -> None:
        """Poll each worker on its own task, so a frozen one delays no one else's reports."""
        self._tasks = [asyncio.create_task(self._poll_forever(w)) for w in self.workers]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _refresh_info(self, w: WorkerHandle, timeout: float) -> bool:
        try:
            w.info = await w.stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=timeout,
                                                metadata=internal_metadata())
            return True
        except grpc.aio.AioRpcError:
            return False

    async def _poll_forever(self, w: WorkerHandle) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.probe(w)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self.probe(w) for w in self.workers))

    def probe_soon(self, w: WorkerHandle) -> None:
        """Check `w` now, without waiting (a call to it just failed): it is down the sooner."""
        task = asyncio.get_running_loop().create_task(self.probe(w, timeout=1.0))
        self._probes.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._probes.discard)

    async def probe(self, w: WorkerHandle, timeout: float | None = None) -> bool:
        """Ask `w` for its load now; update its state. Returns whether it is serving."""
        asked = time.monotonic()
        timeout = timeout or max(0.1, min(2.0, self.liveness_timeout_s))
        try:
            load = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=timeout,
                                        metadata=internal_metadata())
        except grpc.aio.AioRpcError as e:
            # twice unreachable (a refused connection: the process is gone; once could be a
            # connection being replaced), or silent past the liveness deadline (frozen)
            w.failed_probes += 1
            if time.monotonic() - w.last_answer >= self.liveness_timeout_s or \
                    (e.code() == grpc.StatusCode.UNAVAILABLE and w.failed_probes >= 2):
                self._set_state(w, DOWN, f"it does not answer ({e.code().name})")
            return False
        w.failed_probes = 0
        w.report(load, asked)
        state = (SERVING if load.state in ("", SERVING) else
                 DRAINING if load.state == DRAINING else STARTING)
        if state == SERVING and w.state != SERVING:
            await self._refresh_info(w, timeout)  # a restarted worker has a new pid
        self._set_state(w, state, f"it reports {load.state}")
        if w.serving and w.free_pages() > 0:
            self.notify()
        return w.serving

    def _set_state(self, w: WorkerHandle, state: str, why: str) -> None:
        if w.state == state:
            return
        previous, w.state = w.state, state
        level = logging.INFO if state == SERVING else logging.WARNING
        log.log(level, "%s is now %s (was %s): %s", w.name, state, previous, why)
        if state != SERVING:
            w.sent.clear()
            for callback in list(w.watchers):
                callback(f"{w.name} is {state}: {why}")
        self.notify()
        if self.on_change is not None:
            self.on_change()

    def mark_down(self, w: WorkerHandle, why: str) -> None:
        self._set_state(w, DOWN, why)

    def watch(self, w: WorkerHandle, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(reason)` if `w` stops serving; returns the function that unwatches."""
        w.watchers.add(callback)
        return lambda: w.watchers.discard(callback)

    # -- capacity changes ----------------------------------------------------------------------------
    def notify(self) -> None:
        """Wake requests waiting for pages (a request finished, a report showed free pages)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    # -- choosing ------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """Every role has a serving worker (colocated: only decode workers exist)."""
        groups = [g for g in (self.prefill, self.decode) if g]
        return all(any(w.serving for w in g) for g in groups)

    def decode_order(self, pages: int, exclude: set[WorkerHandle] = frozenset(),
                     prefix: list[bytes] | None = None) -> list[WorkerHandle]:
        """Serving decode workers whose pool could ever hold `pages`, best first: with equal
        weights the most free pages first (counting this router's reservations since their
        last report), then the least busy. When the role's groups differ in weight (a faster
        accelerator beside a slower one), workers with room now come first, the fewest requests
        per unit of weight first, so each group takes its share of the load. With `prefix`
        (block hashes of a prompt the worker will prefill itself), a worker that has room now
        and likely holds those blocks (an earlier turn of the conversation ended there) comes
        first."""
        fitting = [w for w in self.decode if w.serving and w not in exclude
                   and (w.info is None or w.info.kv_pages >= pages)]
        if len({w.weight for w in self.decode}) > 1:
            order = sorted(fitting, key=lambda w: (w.free_pages() < pages,
                                                   (w.busy() + 1) / w.weight, -w.free_pages(),
                                                   w.replica))
        else:
            order = sorted(fitting, key=lambda w: (-w.free_pages(), w.busy(), w.replica))
        if prefix:
            held = {w: w.cached_blocks(prefix) for w in order if w.free_pages() >= pages}
            best = max(held, key=held.get, default=None)
            if best is not None and held[best] > 0:
                order.remove(best)
                order.insert(0, best)
        return order

    def largest_decode_pool(self) -> int:
        return max((w.info.kv_pages for w in self.decode if w.info is not None), default=0)

    def choose_prefill(self, prompt: tuple[int, ...], page_size: int,
                       exclude: set[WorkerHandle] = frozenset()) -> WorkerHandle | None:
        """The least busy serving prefill worker (requests in flight per unit of its group's
        weight), or one nearly as idle that likely holds the prompt's first blocks in its prefix
        cache; None when none serves."""
        live = [w for w in self.prefill if w.serving and w not in exclude]
        if not live:
            return None
        hashes = prefix_hashes(prompt, page_size)
        share = lambda w: w.in_flight / w.weight  # noqa: E731 - in flight per unit of weight
        least = min(share(w) for w in live)
        near = [w for w in live if share(w) <= least + 2 / w.weight]
        chosen = max(near, key=lambda w: (w.cached_blocks(hashes), -share(w), -w.replica))
        chosen.remember_blocks(hashes)
        return chosen
