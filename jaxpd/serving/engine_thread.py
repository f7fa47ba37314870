"""The thread that owns an engine: it alone touches the engine and its page pool.

gRPC handlers run on an asyncio loop and never step the engine or read its state: they `call`
a function on this thread (an admission, an abort, a KV write) and await its result, receive
what the engine produces through `deliver`, which hops back onto their loop, and read loads from
`snapshot`, which this thread republishes after every command batch and step. Between commands
the thread runs engine steps while there is work; with none, it sleeps on its inbox, waking every
`tick_s` to run `tick` (reservations and leases expire there, not in a handler).

A command that touches no device state (a decode worker's KV reservation: host bookkeeping
only) may be sent `while_device_runs`: besides between steps, the thread also runs those while
a step waits for its device call (`run_host_commands`, the engine's `while_decoding` hook), so
a new request's reservation does not wait out a multi-step decode call.

A step that raises fails the requests it held (`on_error`) and leaves the thread `broken`: the
pool may have been donated to the failed call, so the worker must not step it again. The worker
then reports NOT_SERVING and exits, to be restarted (`on_broken`, on the loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


class EngineThread:
    def __init__(self, name: str, has_work: Callable[[], bool], step: Callable[[], None],
                 on_error: Callable[[Exception], None], loop: asyncio.AbstractEventLoop, *,
                 tick: Callable[[], None] = lambda: None,
                 snapshot: Callable[[], dict] = dict, tick_s: float = 0.25,
                 on_broken: Callable[[Exception], None] | None = None,
                 on_step: Callable[[float, dict], None] | None = None):
        self._has_work, self._step, self._on_error, self.loop = has_work, step, on_error, loop
        self._tick, self._snapshot, self.tick_s, self._on_broken = tick, snapshot, tick_s, on_broken
        self._on_step = on_step  # (seconds, snapshot before the step): metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._host: queue.SimpleQueue = queue.SimpleQueue()  # commands safe while the device runs
        self._waiter: queue.SimpleQueue | None = None  # device waits (`run_host_commands`)
        self._live = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.broken: Exception | None = None
        self.snapshot: dict = {}  # replaced whole (never mutated): safe to read from the loop

    def start(self) -> None:
        self.snapshot = self._snapshot()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._live = False
        self._inbox.put(None)  # wake it
        self._thread.join(timeout)
        if self._waiter is not None:
            self._waiter.put(None)

    def call(self, fn: Callable[[], Any], *, while_device_runs: bool = False) -> asyncio.Future:
        """Run `fn` on the engine thread; an awaitable for its result (or its exception).
        `while_device_runs`: `fn` does host bookkeeping only, so it may also run while a step
        waits for the device (see the module docstring)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if while_device_runs:
            self._host.put((fn, future))
            self._inbox.put(None)  # wakes an idle thread
        else:
            self._inbox.put((fn, future))
        return asyncio.wrap_future(future, loop=self.loop)

    def run_host_commands(self, wait: Callable[[], None] | None = None) -> None:
        """On the engine thread: run the commands sent `while_device_runs`; with `wait` (a
        function blocking until the step's device call is done; the engine's
        `while_decoding` hook passes it), keep running them as they come until it returns."""
        if wait is not None:
            done = object()
            self._waits().put((wait, done))
        else:
            done = None
        while True:
            try:
                item = self._host.get() if done is not None else self._host.get_nowait()
            except queue.Empty:
                return
            if item is done:
                return
            self._run_command(item)

    def _waits(self) -> queue.SimpleQueue:
        """The queue of a helper thread that runs device waits and then posts their marker on
        the host queue (so the engine thread sleeps on one queue, woken by either)."""
        if self._waiter is None:
            self._waiter = queue.SimpleQueue()

            def serve(jobs: queue.SimpleQueue) -> None:
                while (job := jobs.get()) is not None:
                    wait, marker = job
                    try:
                        wait()
                    except BaseException:  # noqa: BLE001 - the step's fetch reports it
                        pass
                    self._host.put(marker)

            threading.Thread(target=serve, args=(self._waiter,), daemon=True,
                             name=f"{self._thread.name}-device-wait").start()
        return self._waiter

    def post(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the engine thread, not waiting for it (errors are logged)."""
        self._inbox.put((fn, None))

    def deliver(self, fn: Callable[..., Any], *args) -> None:
        """From the engine thread: run `fn(*args)` on the handlers' event loop."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _run_command(self, item) -> None:
        fn, future = item
        if future is not None and not future.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except BaseException as e:  # handed to the awaiting handler, which reports it
            if future is None:
                log.exception("engine command failed")
            else:
                future.set_exception(e)
            return
        finally:  # loads read after a command's answer already count what it did
            self.snapshot = self._snapshot()
        if future is not None:
            future.set_result(result)

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        while self._live:
            working = self._has_work() and self.broken is None
            try:  # block only when idle, and never past the next tick
                item = self._inbox.get(block=not working,
                                       timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = False
            while item is not False:  # drain: commands first, so admissions join this step
                if item is not None:
                    self._run_command(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = False
            self.run_host_commands()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self.tick_s
                self._guarded(self._tick, "tick")
            if self._live and self.broken is None and self._has_work():
                before, began = self.snapshot, time.perf_counter()
                self._guarded(self._step, "step")
                if self._on_step is not None:
                    self._on_step(time.perf_counter() - began, before)
            self.snapshot = self._snapshot()

    def _guarded(self, fn: Callable[[], None], what: str) -> None:
        try:
            fn()
        except Exception as e:
            log.exception("engine %s failed; failing its requests and stopping this worker", what)
            self.broken = e
            try:
                self._on_error(e)
            except Exception:
                log.exception("failing the requests of a broken engine failed too")
            if self._on_broken is not None:
                self.deliver(self._on_broken, e)
