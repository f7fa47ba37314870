"""The engine thread: a step that raises fails the requests it held, leaves the thread broken
(it never steps again: the pool may have been donated to the failed call) and tells the worker,
which then reports NOT_SERVING and exits to be restarted; ticks run even with no work; loads are
published as snapshots."""

from __future__ import annotations

import asyncio

from jaxpd.serving.engine_thread import EngineThread


def test_a_failing_step_fails_its_requests_breaks_the_thread_and_tells_the_worker():
    async def main():
        loop = asyncio.get_running_loop()
        steps, failed, ticks = [], [], []
        broken = asyncio.Event()
        work = {"n": 3}

        def step():
            steps.append(1)
            if len(steps) == 2:
                raise RuntimeError("XLA ran out of device memory")
            work["n"] -= 1

        thread = EngineThread("engine-test", lambda: work["n"] > 0, step, failed.append, loop,
                              tick=lambda: ticks.append(1), snapshot=lambda: {"running": work["n"]},
                              tick_s=0.01, on_broken=lambda e: broken.set())
        thread.start()
        await asyncio.wait_for(broken.wait(), 5)
        await asyncio.sleep(0.1)
        thread.stop()
        return steps, failed, ticks, thread
    steps, failed, ticks, thread = asyncio.run(main())
    assert len(steps) == 2  # never stepped again once broken
    assert [str(e) for e in failed] == ["XLA ran out of device memory"]
    assert isinstance(thread.broken, RuntimeError) and len(ticks) >= 3
    assert thread.snapshot == {"running": 2}


def test_commands_run_on_the_thread_and_their_errors_reach_the_caller():
    async def main():
        loop = asyncio.get_running_loop()
        thread = EngineThread("engine-test", lambda: False, lambda: None, lambda e: None, loop)
        thread.start()
        value = await thread.call(lambda: 41 + 1)
        try:
            await thread.call(lambda: 1 / 0)
        except ZeroDivisionError:
            raised = True
        thread.stop()
        return value, raised
    assert asyncio.run(main()) == (42, True)


def test_host_commands_are_answered_while_a_step_waits_for_the_device():
    """A step stands in for a long decode call: it hands `run_host_commands` (the engine's
    `while_decoding` hook) the wait for its device call. A reservation sent
    `while_device_runs` is answered during that wait; an ordinary command waits for the step."""
    import threading

    async def main():
        loop = asyncio.get_running_loop()
        in_call, release = threading.Event(), threading.Event()
        work = {"n": 1}
        thread: EngineThread

        def step():
            in_call.set()
            thread.run_host_commands(release.wait)  # the device computing until released
            work["n"] = 0

        thread = EngineThread("engine-test", lambda: work["n"] > 0, step, lambda e: None, loop)
        thread.start()
        await loop.run_in_executor(None, in_call.wait, 5)
        order = []
        plain = asyncio.ensure_future(thread.call(lambda: order.append("plain")))
        reserved = await asyncio.wait_for(
            thread.call(lambda: order.append("reserve") or "pages", while_device_runs=True), 5)
        during = list(order)
        release.set()
        await asyncio.wait_for(plain, 5)
        idle = await thread.call(lambda: "idle", while_device_runs=True)  # an idle thread wakes
        thread.stop()
        return reserved, during, order, idle
    reserved, during, order, idle = asyncio.run(main())
    assert reserved == "pages" and during == ["reserve"] and order == ["reserve", "plain"]
    assert idle == "idle"
