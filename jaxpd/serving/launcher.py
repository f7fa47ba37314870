"""The process supervisor behind `jaxpd serve --config FILE`: starts the role processes, waits
until each one really serves, watches them, and tears everything down as one unit.

A deployment starts in stages, because the router needs the workers' addresses:

    launcher = Launcher(echo=sys.stderr if verbose else None)
    with launcher, handle_stop_signals(launcher):          # entry point, main thread
        for spec in worker_specs:
            launcher.start(spec)
        ready = launcher.wait_ready([s.name for s in worker_specs], timeout_s)
        launcher.start(router_spec_using(ready))            # addresses go into its argv
        launcher.wait_ready(["router-0"], remaining_s)
        signum = launcher.serve_forever()                   # until SIGINT/SIGTERM or a death

Every role process prints one `JAXPD_READY {"address": "host:port", ...}` line once it serves;
the launcher then confirms with a `grpc.health.v1` Check (service "") that it reports SERVING.

Failures are raised, never printed or exited on here: `ChildExitedError` (a child died while
starting or serving; the message is the full report, its status and last output lines),
`StartupTimeoutError` (names who never became ready), `LaunchInterrupted` (a stop was requested
during startup), `LaunchError` (anything else). Whenever the launcher raises, or
`serve_forever` returns, every child has already been stopped and reaped: no orphan keeps a
device or a port. The CLI prints `error: {e}`, which gives
`error: prefill-0 (role prefill, replica 0) exited with status 1` and the lines after it.

Children share the launcher's process group (Ctrl-C reaches them too) and get
`PR_SET_PDEATHSIG=SIGTERM` on Linux, so they also stop if the launcher is killed -9. The kernel
ties that signal to the *thread* that started the child: call `start` from the main thread (or
one that lives as long as the launcher).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxpd.errors import ConfigError, JaxpdError
from jaxpd.serving import deathsig
from jaxpd.serving.grpc_server import check_channel

READY_PREFIX = "JAXPD_READY "  # must match jaxpd.serving.process.READY_PREFIX
PROGRESS_PREFIX = "JAXPD_PROGRESS "  # must match jaxpd.serving.process.PROGRESS_PREFIX
LOG_LINES = 40
DEFAULT_GRACE_S = 10.0
_MAX_LINE_BYTES = 64 << 10
_REPORT_LINES_ON_TIMEOUT = 10


# -- errors ----------------------------------------------------------------------------------------
class LaunchError(JaxpdError):
    """Starting or supervising the deployment failed; every child has been stopped already."""


@dataclasses.dataclass(frozen=True)
class ChildExit:
    """How one child ended, and what it printed last."""

    name: str
    role: str
    replica: int
    returncode: int
    last_lines: tuple[str, ...]

    def describe(self) -> str:
        status = describe_status(self.returncode)
        return f"{self.name} (role {self.role}, replica {self.replica}) {status}"

    def report(self) -> str:
        lines = [self.describe()]
        if self.returncode == -signal.SIGKILL:
            lines.append("  (SIGKILL that jaxpd did not send often means the kernel ran out of "
                         "memory: see `dmesg`)")
        if self.last_lines:
            lines.append(f"  last {len(self.last_lines)} line(s) of its output:")
            lines += [f"    {line}" for line in self.last_lines]
        else:
            lines.append("  (it printed nothing)")
        return "\n".join(lines)


class ChildExitedError(LaunchError):
    """A child exited while the deployment was starting or serving."""

    def __init__(self, exits: list[ChildExit], phase: str):
        self.exits, self.phase = exits, phase
        first = exits[0]
        self.name, self.role, self.replica, self.returncode = (
            first.name, first.role, first.replica, first.returncode)
        others = "\n".join(e.report() for e in exits[1:])
        tail = f"\n{others}" if others else ""
        super().__init__(f"{first.report()}{tail}\n(while {phase}; stopped every other process)")


class StartupTimeoutError(LaunchError):
    """Some children did not report SERVING before the startup deadline."""

    def __init__(self, message: str, not_ready: list[str]):
        super().__init__(message)
        self.not_ready = not_ready


class LaunchInterrupted(LaunchError):
    """A stop (SIGINT/SIGTERM) was requested before the deployment was ready."""

    def __init__(self, signum: int | None, not_ready: list[str]):
        self.signum, self.not_ready = signum, not_ready
        what = signal_name(signum) if signum else "a stop request"
        waiting = ", ".join(not_ready) or "no one"
        super().__init__(f"interrupted by {what} while starting ({waiting} not ready yet); "
                         f"stopped every process")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_status(returncode: int) -> str:
    """`exited with status 1` or `was killed by signal SIGKILL`, as Popen.returncode reads."""
    if returncode < 0:
        return f"was killed by signal {signal_name(-returncode)}"
    return f"exited with status {returncode}"


# -- what to start ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """One child: `name` is unique (e.g. "prefill-0"); `env` is its full environment. Children
    with the same `group` are the hosts of one multi-host replica: they stop and restart
    together, and only `host` 0 serves (prints the ready line)."""

    name: str
    role: str
    replica: int
    argv: list[str]
    env: dict[str, str]
    group: str = ""
    host: int = 0

    def describe(self) -> str:
        return f"{self.name} (role {self.role}, replica {self.replica})"


def role_argv(role: str, config_path: str, replica: int = 0,
              extra: Iterable[str] = ()) -> list[str]:
    """`python -m jaxpd.cli serve ROLE --config FILE --replica I [extra...]` with this Python."""
    return [sys.executable, "-m", "jaxpd.cli", "serve", role, "--config", str(config_path),
            "--replica", str(replica), *extra]


def role_spec(role: str, replica: int, config_path: str, env: Mapping[str, str],
              extra: Iterable[str] = (), *, group: str = "", host: int = 0) -> ProcessSpec:
    """A role process's spec (`role-replica`, or `role-replica-hostH` for host H > 0 of a
    multi-host replica); PYTHONUNBUFFERED so its output reaches the log as it happens."""
    name = f"{role}-{replica}" + (f"-host{host}" if host else "")
    return ProcessSpec(name, role, replica, role_argv(role, config_path, replica, extra),
                       {**env, "PYTHONUNBUFFERED": "1"}, group, host)


# -- ports -----------------------------------------------------------------------------------------
def check_port_free(host: str, port: int, key: str, where: str) -> None:
    """Raise ConfigError naming `key` in `where` when `host:port` cannot be listened on, so the
    user learns which setting to change before any process starts. Port 0 always passes.

    The probe binds like the gRPC servers do: SO_REUSEADDR (on POSIX), which on Linux still
    fails against any socket *listening* there and only tolerates TIME_WAIT leftovers of a
    previous run (a restart right after a stop must not be refused); never SO_REUSEPORT, which
    would let a second listener share the port and hide the conflict."""
    if port == 0:
        return
    bare = host.strip("[]")
    try:
        infos = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"{where}: {key}: cannot resolve host {host!r} ({e.strerror})") from None
    for family, kind, proto, _, addr in _distinct(infos):
        _probe_bind(family, kind, proto, addr, f"{where}: {key}: {host}:{port}")


def _distinct(infos: list) -> list:
    seen, out = set(), []
    for info in infos:
        if info[4] not in seen:
            seen.add(info[4])
            out.append(info)
    return out


def _probe_bind(family: int, kind: int, proto: int, addr, label: str) -> None:
    with socket.socket(family, kind, proto) as s:
        if os.name == "posix":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"{label} is already in use (another `jaxpd serve` or another "
                                  f"program listens there); stop it or choose another port"
                                  ) from None
            raise ConfigError(f"{label} cannot be listened on ({e.strerror}; is the host an "
                              f"address of this machine?)") from None


def free_port_pair(host: str, tries: int = 50) -> int:
    """A port P on `host` such that P and P + 1 are both free now (a multi-host replica's
    coordinator and step stream)."""
    bare = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    for _ in range(tries):
        port = free_port(host)
        if port >= 65535:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((bare, port + 1))
            except OSError:
                continue
        return port
    raise LaunchError(f"found no two consecutive free ports on {host}")


def free_port(host: str) -> int:
    """A port on `host` nothing listens on now, for a process started next (the launcher fixes
    every port before starting, so a restarted process binds the same one)."""
    bare = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((bare, 0))
        return s.getsockname()[1]


# -- signals (entry point only) --------------------------------------------------------------------
@contextlib.contextmanager
def handle_stop_signals(launcher: Launcher,
                        signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Route SIGINT/SIGTERM to `launcher.request_stop` for the block, then restore the previous
    handlers. Only for entry points: `signal.signal` works in the main thread only."""
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, lambda signum, frame: launcher.request_stop(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the supervisor --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Child:
    spec: ProcessSpec
    proc: subprocess.Popen
    lines: collections.deque
    reader: threading.Thread | None = None
    ready: dict | None = None  # the parsed JAXPD_READY line
    bad_ready: str | None = None  # a JAXPD_READY line that did not parse, with why
    serving: bool = False  # the health check confirmed SERVING
    progress: dict | None = None  # the last JAXPD_PROGRESS line (compile progress), parsed
    health_note: str = ""  # why it is not confirmed yet
    channel: grpc.Channel | None = None
    failures: int = 0  # restarts in a row that have not reached SERVING yet
    restart_at: float | None = None  # when a scheduled restart happens
    exits: list = dataclasses.field(default_factory=list)  # ChildExit of each earlier life


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """Restart a child that died while serving, `attempts` times in a row at most, after
    `backoff_s` doubling per failed restart (capped at `max_backoff_s`)."""

    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def delay(self, failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * (2 ** failures))


class Launcher:
    """Starts role processes, waits for them to serve, supervises them, and stops them all.

    Call its methods from one thread (the entry point's main thread); only `request_stop` may
    be called from a signal handler or another thread. Use it as a context manager so that any
    exception in the caller still stops every child."""

    def __init__(self, *, echo: TextIO | None = None, grace_s: float = DEFAULT_GRACE_S,
                 log_lines: int = LOG_LINES, poll_s: float = 0.05):
        self.echo, self.grace_s, self.log_lines, self.poll_s = echo, grace_s, log_lines, poll_s
        self._children: dict[str, _Child] = {}
        self._lock = threading.Lock()  # guards each child's lines / ready fields
        self._echo_lock = threading.Lock()
        self._wake = threading.Event()  # set by readers: a ready line or an EOF arrived
        self._stop_signal: int | None = None  # written by request_stop (signal-safe: no locks)
        self._stop_requested = False

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def start(self, spec: ProcessSpec) -> int:
        """Start one child (output piped to the log reader); returns its pid."""
        if spec.name in self._children:
            raise self._stopped(LaunchError(f"two processes are named {spec.name!r}"))
        if not spec.argv:
            raise self._stopped(LaunchError(f"{spec.describe()}: empty command line"))
        if shutil.which(spec.argv[0], path=spec.env.get("PATH", os.defpath)) is None:
            raise self._stopped(LaunchError(
                f"could not start {spec.describe()}: {spec.argv[0]!r} is not an executable"))
        try:
            proc = subprocess.Popen(  # no preexec_fn: see jaxpd/serving/deathsig.py
                deathsig.wrap(list(spec.argv)), env=dict(spec.env), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, close_fds=True,
                start_new_session=False)
        except (OSError, subprocess.SubprocessError) as e:
            raise self._stopped(LaunchError(f"could not start {spec.describe()}: {e}")) from None
        child = _Child(spec, proc, collections.deque(maxlen=self.log_lines))
        child.reader = threading.Thread(target=self._read, args=(child,), daemon=True,
                                        name=f"launcher-log-{spec.name}")
        self._children[spec.name] = child
        child.reader.start()
        return proc.pid

    def wait_ready(self, names: Iterable[str] | None = None, timeout_s: float = 600.0,
                   on_tick: Callable[[], None] | None = None) -> dict[str, dict]:
        """Block until every named child (default: all started) printed its JAXPD_READY line and
        its health check says SERVING; returns {name: ready dict}. Any child dying, a timeout, or
        a stop request stops everything and raises. `on_tick` runs on every poll (a progress
        display)."""
        pending = self._names(names)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self._check_stop(pending)
                self._check_exits("starting")
                self._check_ready_lines(pending)
                for name in pending:
                    self._confirm_serving(self._children[name], deadline)
                if all(self._children[n].serving for n in pending):
                    return {n: dict(self._children[n].ready) for n in pending}
                if time.monotonic() >= deadline:
                    raise self._stopped(self._timeout_error(pending, timeout_s))
                if on_tick is not None:
                    on_tick()
                self._sleep()
        finally:
            for name in pending:
                self._close_channel(self._children[name])

    def serve_forever(self, on_tick: Callable[[], None] | None = None,
                      restart: RestartPolicy | None = None,
                      report: Callable[[str], None] | None = None,
                      stop_first: Iterable[str] = (), first_grace_s: float = 0.0) -> int | None:
        """Supervise until a stop is requested (returns the signal number, or None for a plain
        `request_stop()`). A child that dies is restarted under `restart` (the others keep
        running; `report` hears about it), or, without a policy or once its attempts are used
        up, everything stops and ChildExitedError is raised. On a stop, `stop_first` children
        (the router, draining) get `first_grace_s` before the rest are stopped."""
        while True:
            if self._stop_requested:
                self.stop_some(stop_first, first_grace_s)
                self.stop_all()
                return self._stop_signal
            if restart is None:
                self._check_exits("serving")
            else:
                self._supervise(restart, report or (lambda line: None))
            if on_tick is not None:
                on_tick()
            self._sleep()

    def _supervise(self, policy: RestartPolicy, report: Callable[[str], None]) -> None:
        now = time.monotonic()
        for child in list(self._children.values()):
            if child.restart_at is None and child.proc.poll() is not None:
                if self._stop_requested:
                    return
                exit_ = self._exit_of(child)
                if child.failures >= policy.attempts:
                    self.stop_all()
                    tried = f" (restarted {child.failures} times in a row)" if child.failures else ""
                    raise ChildExitedError([exit_], f"serving{tried}")
                delay, attempt = policy.delay(child.failures), child.failures + 1
                unit = self._unit(child)
                for member in unit:  # a multi-host replica restarts as one
                    if member is not child and member.proc.poll() is None:
                        _signal(member.proc, signal.SIGKILL)  # it may be stuck in a collective
                        member.proc.wait()
                    member.exits.append(exit_ if member is child else self._exit_of(member))
                    member.failures = child.failures + 1
                    member.restart_at = now + delay
                what, it = exit_.describe(), "it"
                if len(unit) > 1:
                    what += (f"; stopped the other {len(unit) - 1} host process(es) of replica "
                             f"{child.spec.group}")
                    it = "the replica as a unit"
                report(f"jaxpd: {what}; restarting {it} in {delay:.1f} s (attempt {attempt} "
                       f"of {policy.attempts}); the others keep serving")
            elif child.restart_at is not None and now >= child.restart_at:
                pid = self._restart(child)
                report(f"jaxpd: restarted {child.spec.name} (pid {pid})")
            elif child.failures and child.restart_at is None and not child.serving:
                if child.spec.host:  # a follower serves when its replica's host 0 does
                    leader = self._unit(child)[0]
                    child.serving = leader.spec.host == 0 and leader.serving
                elif child.ready is not None:
                    self._confirm_serving(child, now + 1.0)
                if child.serving:
                    if not child.spec.host:
                        report(f"jaxpd: {child.spec.name} serves again (pid {child.proc.pid})")
                    child.failures = 0

    def _unit(self, child: _Child) -> list[_Child]:
        """The children that stop and restart with `child` (its multi-host replica), host 0
        first; just itself otherwise."""
        if not child.spec.group:
            return [child]
        return sorted((c for c in self._children.values() if c.spec.group == child.spec.group),
                      key=lambda c: c.spec.host)

    def _exit_of(self, child: _Child) -> ChildExit:
        return ChildExit(child.spec.name, child.spec.role, child.spec.replica,
                         child.proc.returncode, tuple(self.last_lines(child.spec.name)))

    def _restart(self, child: _Child) -> int:
        """Start a dead child again with the same spec (same port, same devices); its pid."""
        self._finish_reader(child)
        self._close_channel(child)
        del self._children[child.spec.name]
        pid = self.start(child.spec)
        fresh = self._children[child.spec.name]
        fresh.failures, fresh.exits = child.failures, child.exits
        return pid

    def stop_some(self, names: Iterable[str], grace_s: float) -> None:
        """SIGTERM the named live children and give them `grace_s` (and the usual grace) to
        exit before the rest are stopped: the router drains first."""
        live = [self._children[n] for n in names
                if n in self._children and self._children[n].proc.poll() is None]
        for child in live:
            _signal(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s + self.grace_s
        for child in live:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(child.proc, signal.SIGKILL)

    def request_stop(self, signum: int | None = None) -> None:
        """Ask `wait_ready`/`serve_forever` to stop everything. Safe in a signal handler: it only
        sets attributes (taking a lock here could deadlock against the interrupted thread)."""
        self._stop_signal = signum
        self._stop_requested = True

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every live child, wait up to `grace_s`, SIGKILL the rest, reap all; returns
        {name: returncode}. Idempotent."""
        live = [c for c in reversed(self._children.values()) if c.proc.poll() is None]
        for child in live:
            _signal(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in live:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(child.proc, signal.SIGKILL)
        for child in self._children.values():
            child.proc.wait()
            self._close_channel(child)
            self._finish_reader(child)
        return {name: c.proc.returncode for name, c in self._children.items()}

    # -- introspection ----------------------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        return {name: c.proc.pid for name, c in self._children.items()}

    def restarts(self) -> dict[str, int]:
        """{name: how many times it was restarted} of the children restarted at least once."""
        return {name: len(c.exits) for name, c in self._children.items() if c.exits}

    def last_lines(self, name: str) -> list[str]:
        with self._lock:
            return list(self._children[name].lines)

    def compile_progress(self) -> dict[str, dict]:
        """{name: last JAXPD_PROGRESS dict} of the children that reported compile progress."""
        with self._lock:
            return {name: dict(c.progress) for name, c in self._children.items() if c.progress}

    def returncodes(self) -> dict[str, int | None]:
        return {name: c.proc.poll() for name, c in self._children.items()}

    # -- output -----------------------------------------------------------------------------------
    def _read(self, child: _Child) -> None:
        """Drain one child's merged stdout/stderr until EOF (never stop early: a full pipe
        would block the child)."""
        stream = child.proc.stdout
        try:
            for raw in iter(lambda: stream.readline(_MAX_LINE_BYTES), b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self._take_line(child, line)
                if not line.startswith(PROGRESS_PREFIX):
                    self._echo_line(child.spec.name, line)
        except (OSError, ValueError):
            pass  # the pipe was closed under us during teardown
        finally:
            self._wake.set()

    def _take_line(self, child: _Child, line: str) -> None:
        if line.startswith(PROGRESS_PREFIX):  # not kept among the last lines: it is no log
            try:
                progress = json.loads(line[len(PROGRESS_PREFIX):])
            except json.JSONDecodeError:
                progress = None
            if isinstance(progress, dict):
                with self._lock:
                    child.progress = progress
                return
        ready = bad = None
        if line.startswith(READY_PREFIX) and child.ready is None and child.bad_ready is None:
            ready, bad = parse_ready_line(line)
        with self._lock:
            child.lines.append(line)
            if ready is not None:
                child.ready = ready
            if bad is not None:
                child.bad_ready = bad
        if ready is not None or bad is not None:
            self._wake.set()

    def _echo_line(self, name: str, line: str) -> None:
        if self.echo is None:
            return
        with self._echo_lock:
            try:
                self.echo.write(f"[{name}] {line}\n")
                self.echo.flush()
            except (OSError, ValueError):
                pass  # a closed or broken echo stream must not stop the draining

    def _finish_reader(self, child: _Child, timeout_s: float = 2.0) -> None:
        """Let the reader take the last lines of an exited child (bounded: a grandchild could
        hold the pipe open)."""
        if child.reader is not None:
            child.reader.join(timeout_s)
            if not child.reader.is_alive() and child.proc.stdout is not None:
                child.proc.stdout.close()

    # -- readiness --------------------------------------------------------------------------------
    def _check_ready_lines(self, pending: list[str]) -> None:
        for name in pending:
            child = self._children[name]
            if child.bad_ready is not None:
                raise self._stopped(LaunchError(
                    f"{child.spec.describe()} printed a bad ready line: {child.bad_ready}"))

    def _confirm_serving(self, child: _Child, deadline: float) -> None:
        if child.serving or child.ready is None:
            return
        address = dialable(child.ready["address"])
        if child.channel is None:
            child.channel = check_channel(address, public=child.spec.role == "router")
        stub = health_pb2_grpc.HealthStub(child.channel)
        timeout = max(0.05, min(1.0, deadline - time.monotonic()))
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as e:
            child.health_note = f"health check on {address}: {e.code().name}"
            return
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        child.serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        child.health_note = f"health check on {address} says {status}"
        if child.serving:
            self._close_channel(child)

    def _timeout_error(self, pending: list[str], timeout_s: float) -> StartupTimeoutError:
        not_ready = [n for n in pending if not self._children[n].serving]
        parts = [f"not ready after {timeout_s:g} s (serving.startup_timeout_s): "
                 f"{', '.join(not_ready)}"]
        for name in not_ready:
            child = self._children[name]
            why = (child.health_note or "no health answer yet") if child.ready is not None \
                else "never printed its JAXPD_READY line"
            parts.append(f"  {child.spec.describe()}: {why}")
            tail = self.last_lines(name)[-_REPORT_LINES_ON_TIMEOUT:]
            parts += [f"    {line}" for line in tail] or ["    (it printed nothing)"]
        return StartupTimeoutError("\n".join(parts), not_ready)

    # -- failures ---------------------------------------------------------------------------------
    def _check_stop(self, pending: list[str]) -> None:
        if self._stop_requested:
            not_ready = [n for n in pending if not self._children[n].serving]
            raise self._stopped(LaunchInterrupted(self._stop_signal, not_ready))

    def _check_exits(self, phase: str) -> None:
        dead = [c for c in self._children.values() if c.proc.poll() is not None]
        if not dead:
            return
        if self._stop_requested:  # a Ctrl-C reaches the children too; that is no failure
            return
        self.stop_all()
        exits = [ChildExit(c.spec.name, c.spec.role, c.spec.replica, c.proc.returncode,
                           tuple(self.last_lines(c.spec.name))) for c in dead]
        raise ChildExitedError(exits, phase)

    def _stopped(self, error: LaunchError) -> LaunchError:
        """Stop and reap every child, then hand back `error` to raise: no failure leaves
        processes behind."""
        self.stop_all()
        return error

    # -- helpers ----------------------------------------------------------------------------------
    def _names(self, names: Iterable[str] | None) -> list[str]:
        chosen = list(self._children) if names is None else list(names)
        unknown = [n for n in chosen if n not in self._children]
        if unknown:
            raise ValueError(f"not started: {', '.join(unknown)}")
        return chosen

    def _sleep(self) -> None:
        self._wake.wait(self.poll_s)
        self._wake.clear()

    @staticmethod
    def _close_channel(child: _Child) -> None:
        if child.channel is not None:
            child.channel.close()
            child.channel = None


def parse_ready_line(line: str) -> tuple[dict | None, str | None]:
    """(ready dict, None) for a good `JAXPD_READY {json}` line, else (None, what is wrong)."""
    body = line[len(READY_PREFIX):]
    try:
        ready = json.loads(body)
    except json.JSONDecodeError as e:
        return None, f"{body!r} is not JSON ({e.msg})"
    if not isinstance(ready, dict) or not isinstance(ready.get("address"), str) \
            or ":" not in ready["address"]:
        return None, f"{body!r} needs an \"address\": \"host:port\""
    return ready, None


def dialable(address: str) -> str:
    """A wildcard listen address (0.0.0.0, [::]) as one the launcher can connect to."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}"
    if host in ("[::]", "::"):
        return f"[::1]:{port}"
    return address


def _signal(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
