"""The one line `jaxpd serve` keeps updated while its workers compile step programs.

Each worker reports `JAXPD_PROGRESS` lines (programs compiled of those planned, seconds so far,
persistent-cache hits; `jaxpd.serving.process`); the launcher keeps the last one per worker and
this view draws them side by side:

    jaxpd: compiling  prefill-0 3/25 4.1 s · decode-0 1/7 2.0 s (cache warm)

On a terminal it is one line redrawn in place (rich); elsewhere (a log file, a pipe) it prints
the same line every few seconds and once when everything is compiled, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text


def describe(name: str, p: dict) -> str:
    """`prefill-0 3/25 4.1 s`, with `(cache warm)` when every program so far came from the
    persistent compilation cache."""
    done, total = int(p.get("done", 0)), int(p.get("total", 0))
    warm = " (cache warm)" if done and int(p.get("cache_hits", 0)) >= done else ""
    return f"{name} {done}/{total} {float(p.get('seconds', 0.0)):.1f} s{warm}"


def all_compiled(progress: dict[str, dict]) -> bool:
    return bool(progress) and all(p.get("done", 0) >= p.get("total", 0) for p in progress.values())


class CompileView:
    """Draws `read()` (name -> last progress dict) on each `tick`; `close` leaves a final line."""

    def __init__(self, read: Callable[[], dict[str, dict]], stream: TextIO | None = None, *,
                 expect: Iterable[str] = (), min_interval_s: float = 0.2,
                 plain_interval_s: float = 5.0):
        stream = sys.stderr if stream is None else stream  # as it is now, not at import
        self.read, self.stream, self.expect = read, stream, set(expect)
        self.console = Console(file=stream, highlight=False)
        self.live: Live | None = None
        self.min_interval_s, self.plain_interval_s = min_interval_s, plain_interval_s
        self._last_draw = 0.0
        self.finished = False

    def line(self, progress: dict[str, dict]) -> str:
        verb = "compiled" if all_compiled(progress) else "compiling"
        return f"jaxpd: {verb}  " + " · ".join(describe(n, p) for n, p in sorted(progress.items()))

    def tick(self) -> None:
        if self.finished:
            return
        progress = self.read()
        if not progress:
            return
        now = time.monotonic()
        done = all_compiled(progress) and self.expect <= set(progress)
        interval = self.min_interval_s if self.console.is_terminal else self.plain_interval_s
        if now - self._last_draw < interval and not done:
            return
        self._last_draw = now
        if self.console.is_terminal:
            if self.live is None:
                self.live = Live(console=self.console, auto_refresh=False, transient=False)
                self.live.start()
            self.live.update(Text(self.line(progress)), refresh=True)
        else:
            print(self.line(progress), file=self.stream, flush=True)
        if done:
            self.close()

    def close(self) -> None:
        """Stop redrawing (the last line stays)."""
        self.finished = True
        if self.live is not None:
            self.live.stop()
            self.live = None
