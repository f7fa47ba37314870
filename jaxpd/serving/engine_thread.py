"""The thread that owns an engine: it alone touches the engine and its page pool.

gRPC handlers run on an asyncio loop and never step the engine: they `call` a function on this
thread (an admission, an abort, a KV write) and await its result, and they receive what the
engine produces through `deliver`, which hops back onto their loop. Between commands the thread
runs engine steps while there is work; with none, it sleeps on its inbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


class EngineThread:
    def __init__(self, name: str, has_work: Callable[[], bool], step: Callable[[], None],
                 on_error: Callable[[Exception], None], loop: asyncio.AbstractEventLoop):
        self._has_work, self._step, self._on_error, self.loop = has_work, step, on_error, loop
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.step_errors = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._live = False
        self._inbox.put(None)  # wake it
        self._thread.join(timeout)

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run `fn` on the engine thread; an awaitable for its result (or its exception)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, future))
        return asyncio.wrap_future(future, loop=self.loop)

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
        if future is not None:
            future.set_result(result)

    def _run(self) -> None:
        while self._live:
            try:  # block only when idle
                item = self._inbox.get(block=not self._has_work())
            except queue.Empty:
                item = False
            while item is not False:  # drain: commands first, so admissions join this step
                if item is not None:
                    self._run_command(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = False
            if self._live and self._has_work():
                try:
                    self._step()
                except Exception as e:  # the worker fails what was in flight; the thread lives on
                    self.step_errors += 1
                    log.exception("engine step failed")
                    self._on_error(e)
