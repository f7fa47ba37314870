"""KV over raw TCP (`serving.transport: tcp`): gRPC carries the control messages, the bytes go
over pooled connections straight into preallocated receive buffers.

Why: grpc-python copies every message into a core slice and out again into a new Python
`bytes`, which caps a KV stream well below what a socket moves (docs/benchmarks.md). Here the
decode worker's data plane reads each frame with `recv_into` into one of two reused buffers, so
no message becomes a Python object; the frames themselves are the same KV frames as gRPC's
(`wire.py`: header with request id, one-time request token, model fingerprint, shape and
CRC-32C), checked by the same code (`KVIntake`) before anything touches the pool. The decode
worker advertises its data plane in its `Reserved` answer ("tcp://host:port"); the router hands
that to the prefill worker as `kv_target`.

On the wire, in both directions: 1 byte kind, 8 bytes big-endian length, the body.
- prefill -> decode: `K` a KV frame (the last one of a request carries `finish`);
- decode -> prefill: `A` the request's `KVAck` after its finish, or `E` a JSON
  `{"code", "message"}` (a gRPC status name) when the push was refused; the receiver then
  closes the connection.
A connection carries one request at a time and goes back to the sender's pool after an ack. A
sender that goes away mid-request (cancel, crash) closes its connection: the receiver fails the
request ABORTED, so it migrates, as with a cut gRPC stream.

`serving.transport: shm` (both workers on one host) uses the same connection for control only:
the sender creates a POSIX shared-memory segment of two frame slots per connection and names it
once (`M`, JSON `{"name", "slot_bytes"}`, accepted from loopback peers only); each frame is
written into a free slot and announced with `S` (slot, length); the receiver copies it into its
receive buffer, answers `R` (slot) to free it, and checks and writes it like a tcp frame. The
advertised address is then "shm://host:port".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import struct
import time
from typing import Callable

import grpc
import jax
import numpy as np

from jaxpd.transfer import wire
from jaxpd.transfer.base import frames_built_ahead
from jaxpd.v1 import worker_pb2

log = logging.getLogger("jaxpd.tcp_plane")

SCHEME = "tcp://"
SHM_SCHEME = "shm://"
AUTO_SCHEME = "auto://"  # shm when the sender reaches it on loopback (same host), else tcp
_HEAD = struct.Struct(">cQ")
_SLOT = struct.Struct(">IQ")
KV, ACK, ERROR = b"K", b"A", b"E"
SEGMENT, SLOT, RELEASE = b"M", b"S", b"R"
LOOPBACK = ("127.", "::1", "::ffff:127.")


class TransferFailed(Exception):
    """A push over the data plane failed; quacks like grpc.aio.AioRpcError (code, details) so
    the prefill worker reports it the same way."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def address(host: str, port: int, scheme: str = SCHEME) -> str:
    return f"{scheme}{host}:{port}"


def same_host(target: str) -> bool:
    """Whether `target`'s host is this host's loopback (where shared memory can be used)."""
    host, _ = _split(target)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(info[4][0].startswith(LOOPBACK) for info in infos)


def choose_transport(target: str, on_accelerator: bool) -> tuple[str, str]:
    """(grpc | tcp | shm | jax, the address to open) for a reservation's KV target:
    host:port is gRPC PushKV; tcp://, shm://, jax:// name themselves; auto:// is shm when the
    decode worker is on this host (reached on loopback), else jax when both sides are
    accelerators (the decode worker then appends "?jax=ADDRESS", its PushKV address for pull
    frames), else tcp."""
    for kind in ("tcp", "shm", "jax"):
        if target.startswith(f"{kind}://"):
            return kind, target
    if not target.startswith(AUTO_SCHEME):
        return "grpc", target
    base, _, pull_at = target.partition("?jax=")
    if same_host(base):
        return "shm", base
    if pull_at and on_accelerator:
        return "jax", f"jax://{pull_at}"
    return "tcp", base


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.split("://", 1)[-1].rpartition(":")
    return host.strip("[]"), int(port)


def _attach(name: str):
    """Map a segment another process created, without this process's resource tracker
    claiming it (the creator unlinks it)."""
    from multiprocessing import resource_tracker, shared_memory

    segment = shared_memory.SharedMemory(name=name)
    with contextlib.suppress(Exception):
        resource_tracker.unregister(segment._name, "shared_memory")
    return segment


def _unmap(segment) -> None:
    """Unmap an attached segment. Views of a frame may still be alive (an exception's
    traceback holds them): collect them first; failing that, the mapping goes with them."""
    try:
        segment.close()
    except BufferError:
        import gc

        gc.collect()
        with contextlib.suppress(BufferError):
            segment.close()


async def _body(loop, sock: socket.socket, length: int, limit: int = 1 << 16) -> bytes:
    if length > limit:
        raise ConnectionError(f"a control frame of {length} bytes")
    buf = bytearray(length)
    await _recv_into(loop, sock, memoryview(buf))
    return bytes(buf)


async def _recv_into(loop, sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if not n:
            raise ConnectionError("the connection closed")
        got += n


# -- the decode side -------------------------------------------------------------------------------
class TcpKVServer:
    """The decode worker's data plane: accepts connections, takes each request's frames through
    a fresh intake (`make_intake()`: an object with `take(raw)`, `failed(e)`, `cancelled(why)`)
    and answers with its ack or its refusal."""

    def __init__(self, host: str, make_intake: Callable[[], object], max_frame_bytes: int,
                 errors: tuple[type[Exception], ...], advertise: str | None = None,
                 scheme: str = SCHEME):
        """Listens on `host`; advertises `advertise`, else `host`, else (a wildcard host)
        this machine's name, which in a Kubernetes pod resolves to the pod."""
        self.host, self.make_intake, self.errors = host, make_intake, errors
        wildcard = host.strip("[]") in ("0.0.0.0", "::", "")
        self.advertise = advertise or (socket.getfqdn() if wildcard else host)
        self.scheme = scheme
        self.max_frame = max_frame_bytes
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self.address = ""

    async def start(self, port: int = 0) -> str:
        """Listen; returns the advertised address, "tcp://host:port"."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host.strip("[]"), port))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self.address = address(self.advertise, listener.getsockname()[1], self.scheme)
        task = asyncio.create_task(self._accept())
        self._tasks.add(task)
        return self.address

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._connection(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connection(self, sock: socket.socket) -> None:
        """Requests one after another: each frame read into one of two reused buffers, or read
        in place from the sender's shared-memory slot."""
        loop = asyncio.get_running_loop()
        head = bytearray(_HEAD.size)
        buffers = [bytearray(self.max_frame), bytearray(self.max_frame)]
        segment, slot_bytes, k = None, 0, 0
        try:
            while True:
                intake, started = self.make_intake(), False
                try:
                    while True:
                        await _recv_into(loop, sock, memoryview(head))
                        kind, length = _HEAD.unpack(head)
                        if kind == SEGMENT:  # the sender's slots (shm), once per connection
                            segment, slot_bytes = self._segment(sock, await _body(loop, sock, length))
                            continue
                        started = True
                        if kind == SLOT and segment is not None and length == _SLOT.size:
                            slot, size = _SLOT.unpack(await _body(loop, sock, length))
                            if slot > 1 or size > slot_bytes:
                                raise self._invalid(f"slot {slot} of {size} bytes")
                            # read in place: the intake copies the payload out (the one copy),
                            # then the slot goes back to the sender; no checksum, the bytes
                            # never left this host's memory
                            view = segment.buf[slot * slot_bytes:slot * slot_bytes + size]
                            error = None
                            try:
                                _, ack = await intake.take(view, verify_crc=False)
                            except BaseException as e:  # its frames hold views of the slot:
                                error = e.with_traceback(None)  # dropped, so it can unmap
                            with contextlib.suppress(BufferError):
                                view.release()
                            del view
                            if error is not None:
                                raise error
                            await loop.sock_sendall(sock, _HEAD.pack(RELEASE, 4) +
                                                    struct.pack(">I", slot))
                        elif kind == KV and length <= self.max_frame:
                            view = memoryview(buffers[k % 2])[:length]
                            k += 1
                            await _recv_into(loop, sock, view)
                            _, ack = await intake.take(view)  # copies the payload out
                        else:
                            raise self._invalid(f"a data-plane frame of kind {kind!r} and "
                                                f"{length} bytes (at most {self.max_frame})")
                        if ack is not None:
                            body = ack.SerializeToString()
                            await loop.sock_sendall(sock, _HEAD.pack(ACK, len(body)) + body)
                            break
                except self.errors as e:
                    code, message = intake.failed(e)
                    body = json.dumps({"code": code.name, "message": message}).encode()
                    with contextlib.suppress(OSError):
                        await loop.sock_sendall(sock, _HEAD.pack(ERROR, len(body)) + body)
                    return
                except (ConnectionError, OSError):
                    if started:
                        intake.cancelled("the prefill worker's data-plane connection closed "
                                         "mid-transfer")
                    return
                except asyncio.CancelledError:
                    if started:
                        intake.cancelled("the decode worker stopped its data plane")
                    raise
        finally:
            sock.close()
            if segment is not None:
                _unmap(segment)

    def _segment(self, sock: socket.socket, body: bytes):
        """Attach the sender's shared-memory slots; only a peer on this host may name one."""
        peer = sock.getpeername()[0]
        if not peer.startswith(LOOPBACK):
            raise self._invalid(f"shared memory offered by {peer}: only a sender on this host "
                                f"may use shm")
        try:
            spec = json.loads(body)
            segment = _attach(str(spec["name"]))
            slot_bytes = int(spec["slot_bytes"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise self._invalid(f"cannot map the sender's shared memory ({e}); shm needs both "
                                f"workers on one host") from None
        if slot_bytes < 1 or 2 * slot_bytes > segment.size:
            segment.close()
            raise self._invalid(f"shared memory of {segment.size} bytes for 2 slots of "
                                f"{slot_bytes}")
        return segment, slot_bytes

    def _invalid(self, message: str) -> Exception:
        return wire.WireError("invalid", message)


def _refused(body: bytes) -> TransferFailed:
    try:
        error = json.loads(body)
        return TransferFailed(grpc.StatusCode[error["code"]], str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return TransferFailed(grpc.StatusCode.UNKNOWN, f"an unreadable answer ({body[:80]!r})")


# -- the prefill side ------------------------------------------------------------------------------
@dataclasses.dataclass
class _Conn:
    """A data-plane connection and, for shm, its two shared-memory frame slots."""

    sock: socket.socket
    segment: object | None = None  # multiprocessing.shared_memory.SharedMemory
    slot_bytes: int = 0
    free: list[int] = dataclasses.field(default_factory=lambda: [0, 1])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.segment is not None:
            with contextlib.suppress(Exception):
                self.segment.close()
                self.segment.unlink()
            self.segment = None


@dataclasses.dataclass(frozen=True)
class _SlotFrame:
    """A frame not yet laid out: its prefix (header) and its payload, a strided view of the
    gathered KV, copied once straight into a shared-memory slot."""

    prefix: bytes
    block: np.ndarray

    def __len__(self) -> int:
        return len(self.prefix) + self.block.nbytes

    def write_into(self, slot: memoryview) -> None:
        n = len(self.prefix)
        slot[:n] = self.prefix
        raw = np.frombuffer(slot, np.uint8, self.block.nbytes, n)
        width = np.dtype(f"u{self.block.dtype.itemsize}")  # bfloat16/fp8: copy as integers
        np.copyto(raw.view(width).reshape(self.block.shape), self.block.view(width))


class TcpKVSender:  # implements transfer.base.KVSender
    """Opens KV streams to decode workers' data planes; connections are pooled per target.
    `shared_memory`: frames go through per-connection shared-memory slots (shm, one host)."""

    def __init__(self, ctx: wire.WireContext, timeout_s: float, *, shared_memory: bool = False):
        self.ctx, self.timeout_s, self.shared_memory = ctx, timeout_s, shared_memory
        self._idle: dict[str, list[_Conn]] = {}

    def open(self, target: str, request_id: str, token: str = "") -> TcpKVStream:
        return TcpKVStream(self, target, request_id, token)

    def _take(self, target: str) -> _Conn | None:
        idle = self._idle.get(target)
        return idle.pop() if idle else None

    def _give_back(self, target: str, conn: _Conn) -> None:
        self._idle.setdefault(target, []).append(conn)

    def close(self) -> None:
        """Close every pooled connection (and unlink its shared memory)."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _connect(self, target: str, deadline: float) -> _Conn:
        loop = asyncio.get_running_loop()
        host, port = _split(target)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr),
                                   max(0.01, deadline - time.monotonic()))
            if self.shared_memory:
                from multiprocessing import shared_memory

                conn.slot_bytes = self.ctx.max_message_bytes + (1 << 16)
                conn.segment = shared_memory.SharedMemory(create=True, size=2 * conn.slot_bytes)
                body = json.dumps({"name": conn.segment.name,
                                   "slot_bytes": conn.slot_bytes}).encode()
                await loop.sock_sendall(sock, _HEAD.pack(SEGMENT, len(body)) + body)
        except BaseException:
            conn.close()
            raise
        return conn


class TcpKVStream:
    """One request's KV on a data-plane connection (taken from the pool on the first send)."""

    def __init__(self, sender: TcpKVSender, target: str, request_id: str, token: str):
        self.sender, self.target, self.request_id, self.token = sender, target, request_id, token
        self.ctx = sender.ctx
        self.deadline = time.monotonic() + sender.timeout_s
        self.bytes = self.messages = 0
        self._conn: _Conn | None = None
        self._fresh = False  # the connection was made for this request (not pooled)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TransferFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"the KV push to "
                                 f"{self.target} took longer than serving.kv_timeout_s")
        return left

    async def _send(self, frame: bytes) -> None:
        for attempt in (0, 1):
            if self._conn is None:
                pooled = self.sender._take(self.target)
                try:
                    self._conn = pooled or await self.sender._connect(self.target, self.deadline)
                except (OSError, asyncio.TimeoutError) as e:
                    raise TransferFailed(grpc.StatusCode.UNAVAILABLE, f"cannot reach the data "
                                         f"plane at {self.target} ({e})") from None
                self._fresh = pooled is None
            try:
                await asyncio.wait_for(self._put(frame), self._left())
                return
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                refusal = await self._refusal()  # the receiver may have said why it hung up
                self._drop()
                if refusal is not None:
                    raise refusal from None
                # a pooled connection the receiver closed since (a restart): once more, fresh
                if attempt == 0 and self.messages == 0 and not self._fresh:
                    continue
                raise TransferFailed(grpc.StatusCode.UNAVAILABLE, f"the data plane at "
                                     f"{self.target} went away ({e})") from None

    async def _put(self, frame: bytes) -> None:
        """One frame onto the connection: its bytes (tcp), or into a free slot and its
        announcement (shm; waiting for the receiver to free a slot when both are taken)."""
        loop, conn = asyncio.get_running_loop(), self._conn
        if conn.segment is None:
            pieces = frame if isinstance(frame, tuple) else (frame,)  # (prefix, payload)
            await loop.sock_sendall(conn.sock, _HEAD.pack(KV, sum(len(p) for p in pieces)))
            for piece in pieces:
                await loop.sock_sendall(conn.sock, piece)
            return
        while not conn.free:
            kind, body = await self._answer(self._left())
            if kind != RELEASE:
                raise _refused(body) if kind == ERROR else ConnectionError(f"answer {kind!r}")
            conn.free.append(struct.unpack(">I", body)[0])
        slot = conn.free.pop()
        base = slot * conn.slot_bytes
        if isinstance(frame, _SlotFrame):  # built in place: the payload's one copy
            frame.write_into(conn.segment.buf[base:base + len(frame)])
        else:
            conn.segment.buf[base:base + len(frame)] = frame
        await loop.sock_sendall(conn.sock, _HEAD.pack(SLOT, _SLOT.size) +
                                _SLOT.pack(slot, len(frame)))

    async def send_tokens(self, array: jax.Array, offset: int, start: int, end: int) -> None:
        """Tokens [start, end) of a gathered array (still on device). shm: each frame is
        written straight into a free slot, without a checksum (the bytes never leave this
        host's memory); tcp: frames with their CRC-32C, built one ahead."""
        if self.sender.shared_memory:
            loop = asyncio.get_running_loop()
            host = await loop.run_in_executor(None, lambda: np.asarray(jax.device_get(array)))
            for header, block in wire.encode_parts(self.ctx, self.request_id, host, offset,
                                                   start, end, self.token):
                f = _SlotFrame(wire.frame_prefix(header, block.nbytes), block)
                await self._send(f)
                self.bytes += len(f)
                self.messages += 1
            return
        async for f in frames_built_ahead(self.ctx, self.request_id, array, offset, start, end,
                                          self.token, parts=True):
            await self._send(f)
            self.bytes += len(f[0]) + len(f[1])
            self.messages += 1

    async def finish(self, num_tokens: int, first_token: int,
                     first_logprob: float) -> worker_pb2.KVAck:
        """Send the finish frame; returns the receiver's ack once it holds all of the KV."""
        return await self.push_frames([wire.finish_frame(
            self.ctx, self.request_id, num_tokens, first_token, first_logprob, self.token)])

    async def push_frames(self, frames: list[bytes]) -> worker_pb2.KVAck:
        """Send ready-made frames, the last one a finish frame, and return the ack."""
        for frame in frames:
            await self._send(frame)
            self.messages += 1
        try:
            while True:
                kind, body = await self._answer(self._left())
                if kind != RELEASE:
                    break
                self._conn.free.append(struct.unpack(">I", body)[0])
        except (OSError, ConnectionError, asyncio.TimeoutError) as e:
            self._drop()
            raise TransferFailed(grpc.StatusCode.UNAVAILABLE, f"the data plane at {self.target} "
                                 f"closed before acknowledging ({e})") from None
        if kind == ACK:
            self._conn.free = [0, 1]
            self.sender._give_back(self.target, self._conn)
            self._conn = None
            return worker_pb2.KVAck.FromString(body)
        self._drop()
        raise _refused(body)

    async def _answer(self, timeout: float) -> tuple[bytes, bytes]:
        """The receiver's (kind, body)."""
        loop = asyncio.get_running_loop()
        head = bytearray(_HEAD.size)
        await asyncio.wait_for(_recv_into(loop, self._conn.sock, memoryview(head)), timeout)
        kind, length = _HEAD.unpack(head)
        if length > 1 << 20:
            raise ConnectionError(f"an answer of {length} bytes")
        body = bytearray(length)
        await asyncio.wait_for(_recv_into(loop, self._conn.sock, memoryview(body)), timeout)
        return kind, bytes(body)

    async def _refusal(self) -> TransferFailed | None:
        """The receiver's refusal, if it sent one before closing (read briefly)."""
        if self._conn is None:
            return None
        try:
            while True:
                kind, body = await self._answer(0.5)
                if kind != RELEASE:
                    return _refused(body) if kind == ERROR else None
        except (OSError, ConnectionError, asyncio.TimeoutError):
            return None

    def cancel(self) -> None:
        """Abandon the push: closing the connection tells the receiver (it fails the request,
        which migrates); the connection is never reused."""
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
