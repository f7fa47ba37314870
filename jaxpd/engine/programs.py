"""The compiled step programs of one model runner, by shape, and the thread that compiles them.

A jitted step compiles on the call that first sees its shape, so without care the first request
of each shape waits for XLA. Here every step program is compiled ahead of time
(`jit(...).lower(...).compile()`: nothing runs, the page pool is not touched, so it is safe
beside a running engine) and kept in a table the runner calls directly:

- `compile(shape)` compiles one shape now (idempotent; a shape being compiled by another thread
  is waited for, never compiled twice);
- `compile_in_background(shapes)` compiles a list on a daemon thread, in order, while the
  engine serves with what is ready; `prefer(shape)` moves a shape a request wanted to the front.

The runner decides what to do with a shape that is not ready (pad up to a ready one, or run
less per step); this module only compiles and counts. `seconds` is the time spent in tracing,
lowering and XLA compilation, whichever thread did it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Iterable, Literal

import jax

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    """One compiled program's shape: `kind` "step" is one model step over `[batch, tokens]`
    (a prefill chunk, or a decode step with tokens 1); "steps" is the multi-step decode call
    over `[batch]` running `tokens` steps with `stops` stop-id columns. `pages` is the page-table
    width."""

    kind: Literal["step", "steps"]
    batch: int
    tokens: int
    pages: int
    stops: int = 0

    def covers(self, other: StepShape) -> bool:
        """Whether this program can run `other`'s work with padding (every dimension at least
        as large; a single step never stands in for a multi-step call or back)."""
        return (self.kind == other.kind and self.batch >= other.batch
                and self.tokens >= other.tokens and self.pages >= other.pages
                and self.stops >= other.stops and (self.kind == "step" or self.tokens == other.tokens))

    @property
    def area(self) -> int:
        """Token slots one call computes (what padding up to this shape costs)."""
        return self.batch * self.tokens

    def __str__(self) -> str:
        if self.kind == "step":
            return f"step[{self.batch}x{self.tokens}, {self.pages} pages]"
        return f"decode[{self.batch} x {self.tokens} steps, {self.pages} pages]"


@dataclasses.dataclass(frozen=True)
class CompileProgress:
    """What a progress display shows: programs ready of those planned, compile seconds so far,
    and how many came from the persistent compilation cache instead of XLA."""

    done: int
    total: int
    seconds: float
    cache_hits: int
    compiling: bool  # the background thread still has work


Lowerer = Callable[[StepShape], "jax.stages.Lowered"]


class StepPrograms:
    """Thread-safe table of compiled step programs, filled on demand or in the background."""

    def __init__(self, lower: Lowerer):
        self._lower = lower
        self._ready: dict[StepShape, jax.stages.Compiled] = {}
        self._busy: dict[StepShape, threading.Event] = {}  # being compiled by some thread
        self._lock = threading.Lock()
        self._queue: collections.deque[StepShape] = collections.deque()
        self._planned: set[StepShape] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._on_progress: Callable[[CompileProgress], None] | None = None
        self._on_demand = False  # the background thread also takes shapes steps ask for
        self._name = "compile"
        self.seconds = 0.0  # tracing + lowering + compiling, all threads
        self.cache_hits = 0  # programs loaded from the persistent cache (counted by JAX's hook)
        self._failed: set[StepShape] = set()  # the background thread does not try these again

    # -- lookups -------------------------------------------------------------------------------
    def get(self, shape: StepShape) -> jax.stages.Compiled | None:
        return self._ready.get(shape)

    def ready(self) -> list[StepShape]:
        with self._lock:
            return list(self._ready)

    def __contains__(self, shape: StepShape) -> bool:
        return shape in self._ready

    def __len__(self) -> int:
        return len(self._ready)

    def compiling(self) -> list[StepShape]:
        """Shapes some thread is compiling right now."""
        with self._lock:
            return list(self._busy)

    # -- compiling -----------------------------------------------------------------------------
    def compile(self, shape: StepShape) -> jax.stages.Compiled:
        """The program for `shape`, compiled now unless it is ready (or another thread is
        compiling it: then this waits for that one)."""
        while True:
            with self._lock:
                program = self._ready.get(shape)
                if program is not None:
                    return program
                busy = self._busy.get(shape)
                if busy is None:
                    busy = self._busy[shape] = threading.Event()
                    mine = True
                else:
                    mine = False
            if not mine:
                busy.wait()
                continue
            try:
                return self._compile_now(shape)
            finally:
                with self._lock:
                    self._busy.pop(shape, None)
                busy.set()

    def _compile_now(self, shape: StepShape) -> jax.stages.Compiled:
        hits_before = _cache_hits.count(threading.get_ident())
        started = time.perf_counter()
        program = self._lower(shape).compile()
        elapsed = time.perf_counter() - started
        hit = _cache_hits.count(threading.get_ident()) > hits_before
        with self._lock:
            self._ready[shape] = program
            self.seconds += elapsed
            self.cache_hits += hit
        log.debug("compiled %s in %.2f s%s", shape, elapsed, " (persistent cache)" if hit else "")
        return program

    def plan(self, shapes: Iterable[StepShape]) -> None:
        """Count `shapes` among the programs planned (for `progress`) without compiling them."""
        with self._lock:
            self._planned.update(shapes)

    def compile_all(self, shapes: Iterable[StepShape],
                    on_progress: Callable[[CompileProgress], None] | None = None) -> int:
        """Compile every shape of `shapes` on this thread; returns how many were new."""
        shapes = list(dict.fromkeys(shapes))
        with self._lock:
            self._planned.update(shapes)
        new = 0
        for shape in shapes:
            if shape not in self._ready:
                self.compile(shape)
                new += 1
            if on_progress is not None:
                on_progress(self.progress())
        return new

    # -- in the background -------------------------------------------------------------------------
    def compile_in_background(self, shapes: Iterable[StepShape] = (),
                              on_progress: Callable[[CompileProgress], None] | None = None,
                              name: str = "compile", *, on_demand: bool = False) -> None:
        """Compile `shapes` (likeliest first) on a daemon thread; the engine keeps serving with
        what is ready. `on_progress` is called on that thread after each program. With
        `on_demand`, shapes a step wants later (`prefer`) are added to the queue too."""
        with self._lock:
            for shape in dict.fromkeys(shapes):
                if shape not in self._ready and shape not in self._queue:
                    self._queue.append(shape)
                self._planned.add(shape)
            self._on_progress = on_progress
            self._on_demand = self._on_demand or on_demand
            self._name = name
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._lock:
            if not self._queue or self._stop.is_set() or (
                    self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()

    def prefer(self, shape: StepShape) -> None:
        """A step wanted `shape`: compile it next (if it is planned, or the background thread
        compiles on demand, and it is not ready or being compiled)."""
        with self._lock:
            if shape in self._ready or shape in self._busy or shape in self._failed:
                return
            if shape in self._queue:
                self._queue.remove(shape)
            elif not self._on_demand:
                return
            self._queue.appendleft(shape)
            self._planned.add(shape)
        self._ensure_thread()

    def stop(self, timeout: float | None = None) -> None:
        """Let the background thread finish its current program and end."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background thread to finish its list; whether it has."""
        thread = self._thread  # the thread clears the attribute when its queue runs dry
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def progress(self) -> CompileProgress:
        with self._lock:
            planned = self._planned | set(self._ready)
            compiling = bool(self._queue) and self._thread is not None and self._thread.is_alive()
            return CompileProgress(len(planned & set(self._ready)), len(planned), self.seconds,
                                   self.cache_hits, compiling)

    def _work(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            with self._lock:
                if not self._queue:
                    self._thread = None  # a later `prefer` starts a new one
                    return
                shape = self._queue.popleft()
            try:
                self.compile(shape)
            except Exception:  # a shape that cannot compile must not end the others
                log.exception("background compilation of %s failed", shape)
                with self._lock:
                    self._failed.add(shape)
                continue
            callback = self._on_progress
            if callback is not None:
                try:
                    callback(self.progress())
                except Exception:
                    log.exception("compile progress callback failed")


def _lower_priority() -> None:
    """Run this (compiling) thread at the lowest CPU priority where the OS allows it, so that on
    a host whose CPUs also run the steps, compiling takes only the time they leave idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: compile at normal priority
        pass


class _CacheHits:
    """Persistent-cache hits per thread, from JAX's own monitoring event."""

    def __init__(self):
        self._counts: collections.Counter[int] = collections.Counter()
        self._registered = False
        self._lock = threading.Lock()

    def count(self, thread_id: int) -> int:
        self._register()
        return self._counts[thread_id]

    def _register(self) -> None:
        with self._lock:
            if self._registered:
                return
            self._registered = True

        def listener(event: str, **kwargs) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                self._counts[threading.get_ident()] += 1

        jax.monitoring.register_event_listener(listener)


_cache_hits = _CacheHits()
