"""The router's choices against fake worker stubs (no processes, no model): a burst spreads,
RESOURCE_EXHAUSTED falls back and then queues, in-flight bookkeeping, prefix affinity, and
request migration when a worker fails or stops answering."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from jaxpd.config import parse_config
from jaxpd.model.checkpoint import default_checkpoint, load_config
from jaxpd.serving.router import Router
from jaxpd.serving.worker_pool import SERVING, WorkerHandle, WorkerPool
from jaxpd.v1 import generation_pb2 as pb, worker_pb2

MODEL = load_config(default_checkpoint())


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def token_at(request: worker_pb2.EngineRequest, position: int) -> int:
    """What a fake worker generates at `position`: a function of the original prompt (the
    prompt without the tokens a migrated request carries) and the position only."""
    original = request.prompt_ids[:len(request.prompt_ids) - request.sample_offset]
    return (sum(original) * 31 + position) % 97 + 3


class FakeCall:
    """An async iterator over events, shaped like a grpc.aio stream call."""

    def __init__(self, events):
        self._events = events
        self.cancelled = False

    async def read(self):
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._events.__anext__()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeDecode:
    """A colocated worker: reserves (or refuses), then streams max_tokens tokens."""

    def __init__(self, free: int = 100, *, refuse: bool = False, fail_at: int | None = None,
                 frozen_at: int | None = None):
        self.free, self.refuse, self.fail_at, self.frozen_at = free, refuse, fail_at, frozen_at
        self.reserved: list[worker_pb2.EngineRequest] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.answers = True
        self.local_prefill: list[bool] = []

    async def GetWorkerInfo(self, request, timeout=None, metadata=None):
        return pb.WorkerInfo(kv_pages=100, page_size=16, pid=1)

    async def GetLoad(self, request, timeout=None, metadata=None):
        if not self.answers:
            await asyncio.sleep(timeout)
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)
        return pb.WorkerLoad(kv_pages_free=self.free, kv_pages_total=100, state=SERVING)

    def Decode(self, request, metadata=None):
        self.local_prefill.append(request.local_prefill)
        return FakeCall(self._run(request.request))

    async def _run(self, er):
        if self.refuse:
            raise rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
        self.reserved.append(er)
        yield worker_pb2.DecodeEvent(reserved=worker_pb2.Reserved(pages=1))
        await self.gate.wait()
        n = er.sampling.max_tokens
        for i in range(n):
            position = er.sample_offset + i
            if self.fail_at is not None and position >= self.fail_at:
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            if self.frozen_at is not None and position >= self.frozen_at:
                self.answers = False
                await asyncio.sleep(3600)
            yield worker_pb2.DecodeEvent(tokens=worker_pb2.Tokens(
                token_ids=[token_at(er, position)], finish_reason="length" if i == n - 1 else ""))
            await asyncio.sleep(0)


class Context:
    def __init__(self, timeout: float | None = None):
        self.timeout = timeout

    def time_remaining(self):
        return self.timeout

    def set_trailing_metadata(self, md):
        pass

    async def abort(self, code, details):
        raise grpc.aio.AbortError(f"{code.name}: {details}")


def make_router(fakes: list[FakeDecode], weights: list[float] | None = None,
                **serving) -> Router:
    weights = weights or [1.0] * len(fakes)
    workers = [WorkerHandle("colocated", i, f"fake-{i}", f, weight=w)
               for i, (f, w) in enumerate(zip(fakes, weights))]
    pool = WorkerPool([], workers, liveness_timeout_s=serving.pop("liveness_timeout_s", 5.0),
                      poll_s=0.05)
    deployment = parse_config({"serving": serving})
    return Router(deployment, MODEL, None, "default", pool=pool)


async def generate(router: Router, prompt: list[int], max_tokens: int = 6,
                   context: Context | None = None) -> tuple[list[int], pb.Complete]:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=max_tokens))
    request.prompt_token_ids.ids.extend(prompt)
    tokens, complete = [], None
    async for response in router.Generate(request, context or Context()):
        if response.HasField("chunk"):
            tokens += response.chunk.token_ids
        else:
            complete = response.complete
    return tokens, complete


def expected(prompt: list[int], n: int) -> list[int]:
    er = worker_pb2.EngineRequest(prompt_ids=prompt)
    return [token_at(er, i) for i in range(n)]


def run(coro):
    return asyncio.run(coro)


def _burst(fakes: list[FakeDecode], first: int, weights: list[float] | None = None):
    """8 requests while every stream is held open: how many each worker reserved, and the
    streams once released."""
    async def main():
        for f in fakes:
            f.gate.clear()  # hold every stream open
        router = make_router(fakes, weights)
        await router.pool.connect(5)
        tasks = [asyncio.create_task(generate(router, [first + i, 11])) for i in range(8)]
        while sum(len(f.reserved) for f in fakes) < 8:
            await asyncio.sleep(0.01)
        counts = [len(f.reserved) for f in fakes]
        for f in fakes:
            f.gate.set()
        results = await asyncio.gather(*tasks)
        await router.close()
        return counts, results
    counts, results = run(main())
    assert [r[0] for r in results] == [expected([first + i, 11], 6) for i in range(8)]
    return counts


def test_a_burst_spreads_over_equally_free_workers():
    """The reports do not change during a burst: the router's own bookkeeping spreads it."""
    assert sorted(_burst([FakeDecode(), FakeDecode()], 10)) == [4, 4]


def test_a_burst_over_groups_of_unequal_weight_follows_their_weights():
    """Two groups (weight 3: a faster accelerator; weight 1), one worker each: a burst of 8
    goes 6 to 2, although the lighter worker reports more free pages."""
    assert _burst([FakeDecode(free=60), FakeDecode(free=100)], 20, weights=[3.0, 1.0]) == [6, 2]


def test_bookkeeping_counts_what_was_sent_since_the_report_was_asked_for():
    w = WorkerHandle("decode", 0, "x", None, load=pb.WorkerLoad(kv_pages_free=10))
    first = w.record_sent(3)
    assert w.free_pages() == 7 and w.busy() == 1
    w.report(pb.WorkerLoad(kv_pages_free=7), asked_at=first.at + 1e-6)  # the report covers it
    second = w.record_sent(2)
    assert w.free_pages() == 5
    w.report(pb.WorkerLoad(kv_pages_free=7), asked_at=second.at - 1.0)  # asked before: still counts
    assert w.free_pages() == 5
    w.forget_sent(second)
    assert w.free_pages() == 7


def test_resource_exhausted_falls_back_to_the_next_worker():
    async def main():
        full, spare = FakeDecode(free=90, refuse=True), FakeDecode(free=10)
        router = make_router([full, spare])
        await router.pool.connect(5)
        out = await generate(router, [3, 4, 5])
        await router.close()
        return out, full, spare
    (tokens, complete), full, spare = run(main())
    assert tokens == expected([3, 4, 5], 6) and complete.finish_reason == "length"
    assert len(spare.reserved) == 1 and not full.reserved


def test_a_request_waits_for_pages_instead_of_failing():
    async def main():
        fakes = [FakeDecode(refuse=True), FakeDecode(refuse=True)]
        router = make_router(fakes)
        await router.pool.connect(5)
        task = asyncio.create_task(generate(router, [7, 8]))
        await asyncio.sleep(0.3)
        waiting = len(router.queue)
        fakes[1].refuse = False  # pages freed on a worker
        router.pool.notify()
        out = await task
        await router.close()
        return waiting, out
    waiting, (tokens, complete) = run(main())
    assert waiting == 1 and tokens == expected([7, 8], 6)


def test_the_queue_is_bounded_and_a_deadline_ends_the_wait():
    async def main():
        router = make_router([FakeDecode(refuse=True)], max_queued=1)
        await router.pool.connect(5)
        first = asyncio.create_task(generate(router, [1, 2], context=Context(timeout=0.5)))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AbortError, match="RESOURCE_EXHAUSTED.*already wait"):
            await generate(router, [1, 2])
        with pytest.raises(grpc.aio.AbortError, match="RESOURCE_EXHAUSTED.*deadline"):
            await first
        assert router.queue == []
        await router.close()
    run(main())


def test_prefix_affinity_prefers_the_worker_that_saw_the_prompt():
    workers = [WorkerHandle("prefill", i, f"p{i}", None, state=SERVING) for i in range(3)]
    pool = WorkerPool(workers, [], liveness_timeout_s=5)
    prompt = tuple(range(100, 180))
    first = pool.choose_prefill(prompt, 16)
    first.in_flight += 1  # still busier by one than the others: within the affinity margin
    assert pool.choose_prefill(prompt, 16) is first
    other = pool.choose_prefill(tuple(range(500, 580)), 16)
    assert other is not first
    first.in_flight += 5  # far busier: load wins over affinity
    assert pool.choose_prefill(prompt, 16) is not first


def test_a_worker_that_fails_mid_stream_hands_the_request_over():
    """The stream continues where it stopped: the new worker gets the prompt plus the tokens
    already generated, sampling counters after them, and what is left of max_tokens."""
    async def main():
        dying, healthy = FakeDecode(free=90, fail_at=3), FakeDecode(free=10)
        router = make_router([dying, healthy])
        await router.pool.connect(5)
        out = await generate(router, [3, 4, 5], max_tokens=8)
        await router.close()
        return out, healthy
    (tokens, complete), healthy = run(main())
    assert tokens == expected([3, 4, 5], 8) and complete.migrations == 1
    moved = healthy.reserved[0]
    assert list(moved.prompt_ids) == [3, 4, 5, *tokens[:3]] and moved.sample_offset == 3
    assert moved.sampling.max_tokens == 5 and moved.request_id.endswith("@1")


def test_migrations_are_bounded_and_the_error_names_the_worker():
    async def main():
        router = make_router([FakeDecode(fail_at=1), FakeDecode(fail_at=1)], max_migrations=2)
        await router.pool.connect(5)
        try:
            await generate(router, [3, 4, 5], max_tokens=8)
        finally:
            await router.close()
    with pytest.raises(grpc.aio.AbortError, match=r"UNAVAILABLE: gave up after 2 migrations.*"
                                                  r"colocated-\d: UNAVAILABLE"):
        run(main())


def test_a_frozen_worker_is_declared_down_and_its_requests_move():
    async def main():
        frozen, healthy = FakeDecode(free=90, frozen_at=2), FakeDecode(free=10)
        router = make_router([frozen, healthy], liveness_timeout_s=0.3)
        await router.pool.connect(5)
        router.pool.start()
        loop = asyncio.get_running_loop()
        began = loop.time()
        out = await generate(router, [9, 9], max_tokens=5)
        took = loop.time() - began
        states = [w.state for w in router.pool.decode]
        await router.close()
        return out, took, states
    (tokens, complete), took, states = run(main())
    assert tokens == expected([9, 9], 5) and complete.migrations == 1
    assert took < 2.0 and states == ["down", "serving"]
    # GetLoads shows the frozen worker as down with zeros, not as an idle worker


def test_a_worker_that_freezes_before_reserving_does_not_hold_new_requests():
    async def main():
        class Silent(FakeDecode):
            def Decode(self, request, metadata=None):
                async def never():
                    await asyncio.sleep(3600)
                    yield None
                return FakeCall(never())
        frozen, healthy = Silent(free=90), FakeDecode(free=10)
        router = make_router([frozen, healthy], liveness_timeout_s=0.3)
        await router.pool.connect(5)
        loop = asyncio.get_running_loop()
        began = loop.time()
        out = await generate(router, [4, 4], max_tokens=3)
        took = loop.time() - began
        await router.close()
        return out, took
    (tokens, complete), took = run(main())
    assert tokens == expected([4, 4], 3) and took < 1.5


def test_with_no_prefill_worker_serving_the_decode_worker_prefills():
    async def main():
        decode = FakeDecode()
        prefill = WorkerHandle("prefill", 0, "p0", None, state="down")
        workers = [WorkerHandle("decode", 0, "d0", decode)]
        pool = WorkerPool([prefill], workers, liveness_timeout_s=5.0)
        await pool._refresh_info(workers[0], 5)
        await pool.probe(workers[0])
        router = Router(parse_config({}), MODEL, None, "default", pool=pool)
        out = await generate(router, [6, 6, 6], max_tokens=4)
        await router.close()
        return out, decode
    (tokens, complete), decode = run(main())
    assert tokens == expected([6, 6, 6], 4) and complete.finish_reason == "length"
    assert decode.local_prefill == [True]


def test_a_conversations_next_turn_goes_where_its_last_turn_ended():
    """A colocated worker keeps a finished turn's blocks in its prefix cache: the follow-up
    (prompt + reply + new text) goes back to it while it has room, even when another worker
    looks freer; an unrelated prompt still goes to the freest."""
    async def main():
        fakes = [FakeDecode(), FakeDecode()]
        router = make_router(fakes)
        await router.pool.connect(5)
        placed = []
        for i in range(4):
            prompt = [(7 * i + k) % 90 + 3 for k in range(40)]
            reply, _ = await generate(router, prompt, max_tokens=24)
            first = next(j for j, f in enumerate(fakes) if f.reserved and
                         list(f.reserved[-1].prompt_ids) == prompt)
            follow_up = prompt + reply + [5, 6, 7]
            await generate(router, follow_up, max_tokens=4)
            second = next(j for j, f in enumerate(fakes) if f.reserved and
                          list(f.reserved[-1].prompt_ids) == follow_up)
            placed.append((first, second))
        await router.close()
        return placed
    placed = run(main())
    assert all(first == second for first, second in placed), placed
    assert {first for first, _ in placed} == {0, 1}  # the first turns still spread
