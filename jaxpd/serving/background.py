"""`jaxpd serve --config FILE` as a child process, for demos, benchmarks and tests.

Starts the launcher, waits for its `jaxpd serving on HOST:PORT` line, keeps its output (for an
error report) and stops it with SIGTERM, which stops every process it started.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Mapping

from jaxpd.errors import JaxpdError

_SERVING = re.compile(r"^jaxpd serving on (\S+)")  # not a worker's echoed log (-v)
_HTTP = re.compile(r"; OpenAI API on (\S+?)\. Ctrl-C")


class ServeProcess:
    def __init__(self, config: str | Path, *, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, extra_args: tuple[str, ...] = (),
                 on_line: Callable[[str], None] | None = None):
        """`on_line` sees every output line as it arrives (on the reader thread)."""
        self.on_line = on_line
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jaxpd.cli", "serve", "--config", str(config), *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(env) if env is not None else None, cwd=cwd)
        self.lines: list[str] = []
        self.http_url: str | None = None  # the OpenAI API's base URL (…/v1), when served
        self._address: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.on_line is not None:
                self.on_line(self.lines[-1])
            match = _SERVING.search(line)
            if match:
                http = _HTTP.search(line)
                self.http_url = http.group(1) if http else None
                self._address.put(match.group(1))
        self._address.put(None)

    def wait_serving(self, timeout: float = 240) -> str:
        """The router's address once every process serves; raises with the output otherwise."""
        try:
            address = self._address.get(timeout=timeout)
        except queue.Empty:
            address = None
        if address is None:
            self.stop()
            raise JaxpdError("jaxpd serve did not start:\n" + "\n".join(self.lines[-40:]))
        return address

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (every process of the deployment stops); SIGKILL past `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
