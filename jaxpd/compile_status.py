"""What `jaxpd generate` shows before its first token while step programs compile.

In-process, a step program compiles the first time its shape is needed (`ModelRunner`,
compile_on_demand), which is silent time before the first token. `CompileStatus` watches the
engine's runners from a thread: once compiling has taken more than `delay_s` and no token has
come out, it shows one updating line on a terminal (rich, cleared when the first token
arrives), and elsewhere prints one line when the first token arrives.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterable, TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text


class CompileStatus:
    def __init__(self, runners: Iterable, stream: TextIO | None = None, *, delay_s: float = 1.0):
        """`stream`: where to show it (default: sys.stderr as it is now, not at import)."""
        self.runners = list({id(r): r for r in runners}.values())
        stream = sys.stderr if stream is None else stream
        self.stream, self.delay_s = stream, delay_s
        self.console = Console(file=stream, highlight=False)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="compile-status", daemon=True)
        self._started = time.perf_counter()
        self._seconds0 = self._seconds()
        self._count0 = self._count()

    def _seconds(self) -> float:
        return sum(r.programs.seconds for r in self.runners)

    def _count(self) -> int:
        return sum(len(r.programs) for r in self.runners)

    def line(self) -> str:
        compiled = self._count() - self._count0
        busy = [str(s) for r in self.runners for s in r.programs.compiling()]
        now = f"; now {busy[0]}" if busy else ""
        return (f"jaxpd: compiling step programs before the first token: {compiled} compiled, "
                f"{time.perf_counter() - self._started:.1f} s{now}")

    def __enter__(self) -> CompileStatus:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.first_token()

    @property
    def done(self) -> bool:
        return self._stopped.is_set()

    def first_token(self) -> None:
        """Stop showing (idempotent); off a terminal, say what compiling cost if it was > delay."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        spent = self._seconds() - self._seconds0
        if not self.console.is_terminal and spent > self.delay_s:
            print(f"jaxpd: compiled {self._count() - self._count0} step programs in {spent:.1f} s "
                  f"before the first token", file=self.stream, flush=True)

    def _watch(self) -> None:
        if self._stopped.wait(self.delay_s) or not self.console.is_terminal:
            return
        if self._seconds() - self._seconds0 == 0 and not any(
                r.programs.compiling() for r in self.runners):
            return  # slow for another reason: nothing to say about compiling
        with Live(Text(self.line()), console=self.console, transient=True,
                  auto_refresh=False) as live:
            while not self._stopped.wait(0.2):
                live.update(Text(self.line()), refresh=True)
