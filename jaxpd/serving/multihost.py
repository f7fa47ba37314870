"""A worker replica that spans several hosts: `jax.distributed`, and the step stream.

Multi-controller JAX runs a mesh's programs on every process that owns some of its devices:
each one must call the same compiled programs, in the same order, on the same replicated
inputs. In a multi-host replica the first host (the *leader*, host index 0) runs the gRPC
server and the scheduler, like a one-host worker. Every device op its runner makes
(`ModelRunner.call`: a step, a multi-step decode call, a KV write or gather) is first published
on the *step stream*, one TCP connection from each other host (a *follower*) to the leader, and
the followers replay it with `ModelRunner.execute`: the same code, on the same values.

Where the processes find each other: the coordinator (jax.distributed's) is the leader's
`host:coordinator_port`, the step stream listens on the next port. `jaxpd serve ROLE --replica I
--host-index H --coordinator HOST:PORT` gives them by hand; under a Kubernetes LeaderWorkerSet
they come from `LWS_LEADER_ADDRESS`, `LWS_WORKER_INDEX` and `LWS_GROUP_SIZE`; `jaxpd serve
--config` on one machine starts every host process of a group itself.

A frame is an 8-byte big-endian length, a JSON header `{"op", "static", "arrays": [[name,
dtype, shape], ...]}`, then each array's bytes. Nothing is unpickled; dtypes come from a fixed
list. A follower proves it belongs to the deployment with the internal secret
(`JAXPD_INTERNAL_SECRET`) in its first frame.

The replica lives and dies as a unit: a follower sends a heartbeat every second; the leader
exits (status 3, to be restarted) as soon as a follower's connection closes or stays silent for
`serving.liveness_timeout_s` (a frozen host), and a follower exits when the leader's connection
closes. The launcher (or the LeaderWorkerSet) then restarts every process of the replica, and
the router moves the replica's requests to other workers meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from jaxpd.errors import ConfigError, JaxpdError

log = logging.getLogger("jaxpd.multihost")

HEARTBEAT_S = 1.0
_LENGTH = struct.Struct(">Q")
_MAX_HEADER = 1 << 20
_DTYPES = {name: np.dtype(t) for name, t in (
    ("int32", np.int32), ("uint32", np.uint32), ("int64", np.int64), ("float32", np.float32),
    ("float16", np.float16), ("bool", np.bool_), ("bfloat16", ml_dtypes.bfloat16),
    ("float8_e4m3fn", ml_dtypes.float8_e4m3fn), ("int8", np.int8))}
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_WORKER_INDEX", "LWS_GROUP_SIZE")


class HostLost(JaxpdError):
    """The other end of the step stream went away (died, froze, or stopped)."""


@dataclasses.dataclass(frozen=True)
class HostGroup:
    """Which host of a multi-host replica this process is, and where the leader is."""

    hosts: int
    index: int  # 0 = the leader
    coordinator: str  # host:port of jax.distributed's coordinator (on the leader)

    @property
    def leader(self) -> bool:
        return self.index == 0

    @property
    def steps_address(self) -> tuple[str, int]:
        host, _, port = self.coordinator.rpartition(":")
        return host.strip("[]"), int(port) + 1


def resolve(hosts: int, key: str, host_index: int | None, coordinator: str | None,
            coordinator_port: int, env: Mapping[str, str] = os.environ) -> HostGroup | None:
    """The HostGroup of a process of a `hosts`-host group (None for one host), from the flags or
    else the LeaderWorkerSet environment. Errors say which flag or variable to set."""
    if hosts == 1:
        if host_index not in (None, 0):
            raise ConfigError(f"--host-index {host_index}: {key}.hosts is 1 (one process per "
                              f"replica)")
        return None
    if host_index is None and env.get("LWS_WORKER_INDEX", "").strip():
        try:
            host_index = int(env["LWS_WORKER_INDEX"])
        except ValueError:
            raise ConfigError(f"LWS_WORKER_INDEX={env['LWS_WORKER_INDEX']!r} is not an "
                              f"integer") from None
    if host_index is None:
        raise ConfigError(f"{key}.hosts is {hosts}: say which host this process is with "
                          f"--host-index 0..{hosts - 1} (0 runs the server), or run it under a "
                          f"LeaderWorkerSet (LWS_WORKER_INDEX)")
    if not 0 <= host_index < hosts:
        raise ConfigError(f"--host-index {host_index}: {key}.hosts is {hosts} (0..{hosts - 1})")
    size = env.get("LWS_GROUP_SIZE", "").strip()
    if size and size != str(hosts):
        raise ConfigError(f"LWS_GROUP_SIZE={size} but {key}.hosts is {hosts}: the "
                          f"LeaderWorkerSet's size must be the group's hosts")
    if coordinator is None and env.get("LWS_LEADER_ADDRESS", "").strip():
        coordinator = f"{env['LWS_LEADER_ADDRESS'].strip()}:{coordinator_port}"
    if coordinator is None:
        raise ConfigError(f"{key}.hosts is {hosts}: give the first host's address with "
                          f"--coordinator HOST:PORT (PORT is {key}.coordinator_port, "
                          f"{coordinator_port}), or run under a LeaderWorkerSet "
                          f"(LWS_LEADER_ADDRESS)")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ConfigError(f"--coordinator {coordinator!r}: expected HOST:PORT")
    return HostGroup(hosts, host_index, coordinator)


def initialize(group: HostGroup, timeout_s: float) -> None:
    """Join the replica's jax.distributed group (before anything touches a device). On CPU the
    collectives between processes go over gloo."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("host %d of %d: joining jax.distributed at %s", group.index, group.hosts,
             group.coordinator)
    jax.distributed.initialize(group.coordinator, num_processes=group.hosts,
                               process_id=group.index,
                               initialization_timeout=max(1, int(timeout_s)))


# -- frames ----------------------------------------------------------------------------------------
def _dtype_name(dtype: np.dtype) -> str:
    for name, known in _DTYPES.items():
        if dtype == known:
            return name
    raise TypeError(f"the step stream does not carry {dtype} arrays")


def encode(op: str, static: dict, arrays: Mapping[str, np.ndarray]) -> list[bytes | memoryview]:
    """The frame's buffers (header length, header, each array's bytes), ready for sendmsg."""
    parts, specs = [], []
    for name, value in arrays.items():
        arr = np.require(value, requirements="C")  # (ascontiguousarray makes 0-d 1-d)
        specs.append([name, _dtype_name(arr.dtype), list(arr.shape)])
        parts.append(memoryview(arr.reshape(-1).view(np.uint8)))
    header = json.dumps({"op": op, "static": static, "arrays": specs}).encode()
    return [_LENGTH.pack(len(header)), header, *parts]


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise HostLost("connection closed")
        got += n
    return buf


def receive(sock: socket.socket) -> tuple[str, dict, dict[str, np.ndarray]]:
    """One frame: (op, static values, arrays). Raises HostLost on a closed connection and
    ValueError on a malformed frame."""
    (size,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    if size > _MAX_HEADER:
        raise ValueError(f"frame header of {size} bytes")
    header = json.loads(_recv_exactly(sock, size))
    arrays = {}
    for name, dtype, shape in header["arrays"]:
        dt = _DTYPES[dtype]  # KeyError: a dtype outside the list
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        arrays[name] = np.frombuffer(_recv_exactly(sock, count * dt.itemsize), dt).reshape(shape)
    return header["op"], header["static"], arrays


def _send(sock: socket.socket, parts: list) -> None:
    data = [p for p in parts if len(p)]
    while data:
        sent = sock.sendmsg(data)
        while data and sent >= len(data[0]):
            sent -= len(data[0])
            data.pop(0)
        if data and sent:
            data[0] = memoryview(data[0])[sent:]


# -- the leader ------------------------------------------------------------------------------------
class StepLeader:
    """The leader's end: accepts the followers, publishes every device op to them, and watches
    them. `on_lost(why)` runs (on a watcher thread) when one dies or goes silent."""

    def __init__(self, group: HostGroup, secret: str, liveness_s: float,
                 on_lost: Callable[[str], None]):
        self.group, self.secret, self.liveness_s, self.on_lost = group, secret, liveness_s, on_lost
        self._followers: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._closing = False
        self.frames = 0
        self.bytes = 0
        _, port = group.steps_address
        self._listener = socket.create_server(("", port), family=socket.AF_INET6,
                                              dualstack_ipv6=True) \
            if socket.has_dualstack_ipv6() else socket.create_server(("", port))

    def accept(self, timeout_s: float) -> None:
        """Wait for every follower to connect and prove the secret."""
        deadline = time.monotonic() + timeout_s
        while len(self._followers) < self.group.hosts - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, self.group.hosts)) - set(self._followers))
                raise JaxpdError(f"hosts {missing} of this replica did not connect to the step "
                                 f"stream within {timeout_s:g} s (serving.startup_timeout_s)")
            self._listener.settimeout(min(left, 1.0))
            try:
                conn, peer = self._listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(10.0)
            try:
                op, static, _ = receive(conn)
                given = str(static.get("secret", ""))
                index = int(static.get("host", -1))
            except (HostLost, ValueError, KeyError, TypeError, OSError) as e:
                log.warning("step stream: dropped a connection from %s (%s)", peer, e)
                conn.close()
                continue
            if op != "hello" or not hmac.compare_digest(given.encode(), self.secret.encode()) \
                    or not 0 < index < self.group.hosts or index in self._followers:
                log.warning("step stream: refused %s (host %s: wrong secret, index or a "
                            "second connection)", peer, index)
                conn.close()
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._followers[index] = conn
            log.info("step stream: host %d connected from %s", index, peer[0])
        self._listener.close()
        for index, conn in self._followers.items():
            threading.Thread(target=self._watch, args=(index, conn), daemon=True,
                             name=f"step-watch-{index}").start()

    def publish(self, op: str, static: dict, arrays: Mapping[str, np.ndarray],
                per_host: Callable[[int], Mapping[str, np.ndarray]] | None = None) -> None:
        """Send one device op to every follower (before the leader runs it); `per_host(i)`
        adds the arrays only host i gets (its share of a KV write)."""
        shared = None if per_host is not None else encode(op, static, arrays)
        with self._lock:
            for index, conn in self._followers.items():
                parts = shared or encode(op, static, {**arrays, **per_host(index)})
                try:
                    _send(conn, parts)
                except OSError as e:
                    raise HostLost(f"host {index} of this replica is gone ({e})") from None
                self.bytes += sum(len(p) for p in parts)
            self.frames += 1

    def _watch(self, index: int, conn: socket.socket) -> None:
        """Read the follower's heartbeats; anything else (EOF, silence) ends the replica. The
        socket stays blocking (a timeout would make the leader's sends non-blocking too: they
        share it), so silence is found with select."""
        why = None
        try:
            while why is None:
                readable, _, _ = select.select([conn], [], [], self.liveness_s)
                if not readable:
                    why = f"host {index} of this replica sent no heartbeat for " \
                          f"{self.liveness_s:g} s (frozen?)"
                else:
                    receive(conn)
        except (HostLost, OSError, ValueError) as e:
            why = f"host {index} of this replica is gone ({e})"
        if not self._closing:
            self.on_lost(why)

    def close(self) -> None:
        """Tell the followers to stop (the leader is stopping)."""
        self._closing = True
        with contextlib.suppress(OSError, HostLost):
            self.publish("stop", {}, {})
        for conn in self._followers.values():
            with contextlib.suppress(OSError, HostLost):
                conn.close()


# -- a follower ------------------------------------------------------------------------------------
def connect(group: HostGroup, secret: str, timeout_s: float) -> socket.socket:
    """Connect to the leader's step stream (retrying while it starts) and say hello."""
    host, port = group.steps_address
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5.0)
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise JaxpdError(f"host {group.index}: could not reach the leader's step stream "
                                 f"at {host}:{port} within {timeout_s:g} s ({e})") from None
            time.sleep(0.2)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _send(sock, encode("hello", {"host": group.index, "secret": secret}, {}))
    return sock


def follow(sock: socket.socket, execute: Callable[[str, dict, dict], object],
           index: int) -> int:
    """Replay the leader's device ops until it says stop (returns 0) or goes away (returns 3,
    the status that gets the replica restarted). Heartbeats go out on their own thread."""
    stop = threading.Event()

    def beat() -> None:
        frame = encode("heartbeat", {}, {})
        while not stop.wait(HEARTBEAT_S):
            try:
                _send(sock, frame)
            except OSError:
                return

    threading.Thread(target=beat, daemon=True, name="step-heartbeat").start()
    ops = 0
    try:
        while True:
            try:
                op, static, arrays = receive(sock)
            except HostLost:
                log.error("host %d: the leader closed the step stream without a stop (it died); "
                          "exiting so the replica restarts as a unit", index)
                return 3
            if op == "stop":
                log.info("host %d: the leader stopped; %d device ops replayed", index, ops)
                return 0
            execute(op, static, arrays)
            ops += 1
    finally:
        stop.set()
        sock.close()
