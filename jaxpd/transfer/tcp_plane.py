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
"""

from __future__ import annotations

import asyncio
import contextlib
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
from jaxpd.v1 import worker_pb2

log = logging.getLogger("jaxpd.tcp_plane")

SCHEME = "tcp://"
_HEAD = struct.Struct(">cQ")
KV, ACK, ERROR = b"K", b"A", b"E"


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


def address(host: str, port: int) -> str:
    return f"{SCHEME}{host}:{port}"


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.removeprefix(SCHEME).rpartition(":")
    return host.strip("[]"), int(port)


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
                 errors: tuple[type[Exception], ...], advertise: str | None = None):
        """Listens on `host`; advertises `advertise`, else `host`, else (a wildcard host)
        this machine's name, which in a Kubernetes pod resolves to the pod."""
        self.host, self.make_intake, self.errors = host, make_intake, errors
        wildcard = host.strip("[]") in ("0.0.0.0", "::", "")
        self.advertise = advertise or (socket.getfqdn() if wildcard else host)
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
        self.address = address(self.advertise, listener.getsockname()[1])
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
        """Requests one after another, each frame read into one of two reused buffers."""
        loop = asyncio.get_running_loop()
        head = bytearray(_HEAD.size)
        buffers = [bytearray(self.max_frame), bytearray(self.max_frame)]
        k = 0
        try:
            while True:
                intake, started = self.make_intake(), False
                try:
                    while True:
                        await _recv_into(loop, sock, memoryview(head))
                        started = True
                        kind, length = _HEAD.unpack(head)
                        if kind != KV or length > self.max_frame:
                            raise self._invalid(f"a data-plane frame of kind {kind!r} and "
                                                f"{length} bytes (at most {self.max_frame})")
                        view = memoryview(buffers[k % 2])[:length]
                        k += 1
                        await _recv_into(loop, sock, view)
                        _, ack = await intake.take(view)  # copies the payload out of the buffer
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

    def _invalid(self, message: str) -> Exception:
        return wire.WireError("invalid", message)


def _refused(body: bytes) -> TransferFailed:
    try:
        error = json.loads(body)
        return TransferFailed(grpc.StatusCode[error["code"]], str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return TransferFailed(grpc.StatusCode.UNKNOWN, f"an unreadable answer ({body[:80]!r})")


# -- the prefill side ------------------------------------------------------------------------------
class TcpKVSender:  # implements transfer.base.KVSender
    """Opens KV streams to decode workers' data planes; connections are pooled per target."""

    def __init__(self, ctx: wire.WireContext, timeout_s: float):
        self.ctx, self.timeout_s = ctx, timeout_s
        self._idle: dict[str, list[socket.socket]] = {}

    def open(self, target: str, request_id: str, token: str = "") -> TcpKVStream:
        return TcpKVStream(self, target, request_id, token)

    def _take(self, target: str) -> socket.socket | None:
        idle = self._idle.get(target)
        return idle.pop() if idle else None

    def _give_back(self, target: str, sock: socket.socket) -> None:
        self._idle.setdefault(target, []).append(sock)

    async def _connect(self, target: str, deadline: float) -> socket.socket:
        loop = asyncio.get_running_loop()
        host, port = _split(target)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), max(0.01, deadline - time.monotonic()))
        except BaseException:
            sock.close()
            raise
        return sock


class TcpKVStream:
    """One request's KV on a data-plane connection (taken from the pool on the first send)."""

    def __init__(self, sender: TcpKVSender, target: str, request_id: str, token: str):
        self.sender, self.target, self.request_id, self.token = sender, target, request_id, token
        self.ctx = sender.ctx
        self.deadline = time.monotonic() + sender.timeout_s
        self.bytes = self.messages = 0
        self._sock: socket.socket | None = None
        self._fresh = False  # the connection was made for this request (not pooled)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TransferFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"the KV push to "
                                 f"{self.target} took longer than serving.kv_timeout_s")
        return left

    async def _send(self, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        head = _HEAD.pack(KV, len(frame))
        for attempt in (0, 1):
            if self._sock is None:
                pooled = self.sender._take(self.target)
                try:
                    self._sock = pooled or await self.sender._connect(self.target, self.deadline)
                except (OSError, asyncio.TimeoutError) as e:
                    raise TransferFailed(grpc.StatusCode.UNAVAILABLE, f"cannot reach the data "
                                         f"plane at {self.target} ({e})") from None
                self._fresh = pooled is None
            try:
                await asyncio.wait_for(loop.sock_sendall(self._sock, head), self._left())
                await asyncio.wait_for(loop.sock_sendall(self._sock, frame), self._left())
                return
            except (OSError, asyncio.TimeoutError) as e:
                refusal = await self._refusal()  # the receiver may have said why it hung up
                self._drop()
                if refusal is not None:
                    raise refusal from None
                # a pooled connection the receiver closed since (a restart): once more, fresh
                if attempt == 0 and self.messages == 0 and not self._fresh:
                    continue
                raise TransferFailed(grpc.StatusCode.UNAVAILABLE, f"the data plane at "
                                     f"{self.target} went away ({e})") from None

    async def send_tokens(self, array: jax.Array, offset: int, start: int, end: int) -> None:
        """Tokens [start, end) of a gathered array (still on device), frames built one ahead
        off the event loop, as the gRPC stream does."""
        loop = asyncio.get_running_loop()
        host = await loop.run_in_executor(None, lambda: np.asarray(jax.device_get(array)))
        frames = wire.encode_tokens(self.ctx, self.request_id, host, offset, start, end, self.token)
        pending = loop.run_in_executor(None, next, frames, None)
        while (f := await pending) is not None:
            pending = loop.run_in_executor(None, next, frames, None)
            await self._send(f)
            self.bytes += len(f)
            self.messages += 1
            del f

    async def finish(self, num_tokens: int, first_token: int,
                     first_logprob: float) -> worker_pb2.KVAck:
        """Send the finish frame; returns the receiver's ack once it holds all of the KV."""
        await self._send(wire.finish_frame(self.ctx, self.request_id, num_tokens, first_token,
                                           first_logprob, self.token))
        self.messages += 1
        try:
            kind, body = await self._answer(self._left())
        except (OSError, ConnectionError, asyncio.TimeoutError) as e:
            self._drop()
            raise TransferFailed(grpc.StatusCode.UNAVAILABLE, f"the data plane at {self.target} "
                                 f"closed before acknowledging ({e})") from None
        if kind == ACK:
            self.sender._give_back(self.target, self._sock)
            self._sock = None
            return worker_pb2.KVAck.FromString(body)
        self._drop()
        raise _refused(body)

    async def _answer(self, timeout: float) -> tuple[bytes, bytes]:
        """The receiver's (kind, body)."""
        loop = asyncio.get_running_loop()
        head = bytearray(_HEAD.size)
        await asyncio.wait_for(_recv_into(loop, self._sock, memoryview(head)), timeout)
        kind, length = _HEAD.unpack(head)
        if length > 1 << 20:
            raise ConnectionError(f"an answer of {length} bytes")
        body = bytearray(length)
        await asyncio.wait_for(_recv_into(loop, self._sock, memoryview(body)), timeout)
        return kind, bytes(body)

    async def _refusal(self) -> TransferFailed | None:
        """The receiver's refusal, if it sent one before closing (read briefly)."""
        if self._sock is None:
            return None
        try:
            kind, body = await self._answer(0.5)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            return None
        return _refused(body) if kind == ERROR else None

    def cancel(self) -> None:
        """Abandon the push: closing the connection tells the receiver (it fails the request,
        which migrates); the connection is never reused."""
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
