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
