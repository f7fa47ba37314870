"""KV transfer throughput between two processes on loopback: jaxpd's gRPC KV stream beside a
plain protobuf stream and a raw TCP socket copy of the same bytes, in one run.

What it measures. One request's KV cache in a model's canonical wire layout, the array
`[layers, 2 (K, V), kv_heads, tokens, head_dim]` (`--preset`, `--tokens`, `--dtype`; seeded
random data), sent from this process to a receiver in a separate process (multiprocessing
"spawn") over 127.0.0.1, the same bytes in every case:

- `raw_socket`: `sendall` of the KV's contiguous memory (consecutive slices of the largest
  message size, no copies), `recv_into` one preallocated buffer until every byte arrived, then
  a 1-byte ack. The ceiling on this host.
- `grpc_bytes`: the payload pieces as ready-made `bytes` messages (built before the clock
  starts) on a gRPC client stream whose receiver only counts them: what grpcio itself moves,
  with no framing, checks or copies of ours: the most any gRPC case can reach.
- `grpc_plain`: the plain way: protobuf `KVChunk(header, data=payload.tobytes())` messages built
  and serialized by protobuf (`SerializeToString`) and parsed by `KVChunk.FromString` on the
  receiver, which then does what `grpc_kv`'s receiver does (`check_piece`: fingerprint, dtype,
  shape, CRC-32C; copy into the pool). The receivers' work is the same as `grpc_kv`'s; the
  sender builds each message inline, on the event loop, as the plain way would.
- `grpc_kv`: jaxpd's path: the prefill worker's `GrpcKVStream` (frames from
  `wire.encode_tokens`: the one payload copy and the CRC, built one frame ahead off the event
  loop) to a receiver registered like the decode worker's PushKV (`request_deserializer=None`,
  raw frames in, `wire.parse_frame` + `wire.check_piece`, zero-copy payload view); each piece is
  copied (`np.copyto` into its slice) into a preallocated host "pool" array on one writer thread
  (the decode worker writes on its scheduler thread), and the finish frame is answered with
  `KVAck` once every write is done.

The gRPC cases run at each `--message-mib` (the wire's `max_message_bytes`: whole layers per
message while they fit, else token slices of one layer). Every case runs once as a warm-up,
then `--repeats` timed runs; one channel is kept for all runs of a case, as a prefill worker
keeps one per decode worker. After each case the receiver's copy is checked against the
sender's (CRC-32C of the whole buffer or pool, outside the clock), so a fast wrong transfer
cannot pass. Each gRPC case gets a fresh receiver process; every receiver is stopped on every
exit path (and ends itself if this process is killed).

How to run it (progress on stderr, one JSON object on stdout):

    .venv/bin/python tools/bench_transfer.py                    # llama3-8b, bf16, 2048 tokens
    .venv/bin/python tools/bench_transfer.py --tokens 512 --message-mib 4,16 --repeats 1
    .venv/bin/python tools/bench_transfer.py --quick            # smoke run, a few seconds

How to read it. `cases.<name>` (gRPC ones as `<name>_<N>mib`) holds `seconds` (median of the
timed runs, sender's first byte to the receiver's ack), `gb_per_s` (KV payload bytes / seconds /
1e9; frame headers not counted), `bytes`, `messages` (including the finish message where there
is one), the individual `runs_s` and, for gRPC cases, `ratio_to_raw` (gb_per_s over
`raw_socket`'s). `summary` repeats the GB/s figures as one table. `grpc_kv` against `grpc_plain`
is what jaxpd's framing (and its sender building frames ahead) buys; `grpc_kv` against `grpc_bytes` is what is left of ours on top of
grpcio; `grpc_bytes` against `raw_socket` is grpcio's own cost. Loopback figures are CPU- and
memory-bound (both ends share the host's cores), so compare cases within one run on a quiet
machine, not across runs or hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import shlex
import signal
import socket
import statistics
import sys
import threading
import time
from typing import Self

import numpy as np

FINGERPRINT = b"bench-transfer-0"  # 16 bytes, as wire.model_fingerprint makes
DIGEST_ID = "__digest__"  # a finish-only request asking the receiver for its pool's CRC-32C
QUICK = {"tokens": 256, "repeats": 1, "message_mib": [4]}
DEFAULTS = {"tokens": 2048, "repeats": 3, "message_mib": [1, 4, 16, 64]}
START_TIMEOUT_S = 180.0


def _mib_list(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated MiB counts, got {text!r}") \
            from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"message sizes must be >= 1 MiB, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def layout_for(preset: str, dtype: str):
    from jaxpd.kv.layout import KVLayout
    from jaxpd.model.presets import get_preset

    cfg = get_preset(preset)
    return KVLayout(num_layers=cfg.num_layers, model_kv_heads=cfg.num_kv_heads, head_repeat=1,
                    head_dim=cfg.head_dim, page_size=16, dtype=dtype, tp=1)


def kv_shape(layout, tokens: int) -> tuple[int, ...]:
    return (layout.num_layers, 2, layout.model_kv_heads, tokens, layout.head_dim)


def kv_array(layout, tokens: int, seed: int = 0) -> np.ndarray:
    """Seeded random KV in the wire dtype, made a layer at a time (no full float32 temporary)."""
    from jaxpd.transfer.wire import WIRE_DTYPES

    rng = np.random.default_rng(seed)
    out = np.empty(kv_shape(layout, tokens), WIRE_DTYPES[layout.dtype])
    for layer in out:
        layer[...] = rng.standard_normal(layer.shape, np.float32)
    return out


def raw_view(a: np.ndarray) -> np.ndarray:
    """The same memory as unsigned integers of the item size: a plain byte copy for any dtype
    (ml_dtypes' bfloat16 does not export the buffer protocol)."""
    return a.view(np.dtype(f"<u{a.dtype.itemsize}"))


def crc_of(a: np.ndarray) -> int:
    from jaxpd.transfer.wire import crc32c

    return crc32c(raw_view(np.ascontiguousarray(a)).view(np.uint8).reshape(-1))


def split(ctx, tokens: int) -> list[tuple[int, int, int, int]]:
    """(layer_start, layer_end, token_start, token_end) of each message, as `encode_tokens` cuts."""
    from jaxpd.transfer.wire import split_ranges

    return split_ranges(ctx.layout.num_layers, tokens, ctx.bytes_per_layer_token(),
                        ctx.max_message_bytes)


# -- child processes ---------------------------------------------------------------------------
def _exit_with_parent() -> None:
    """Receivers end themselves if the benchmark dies without stopping them (e.g. SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _socket_receiver(q, total: int, rounds: int, timeout_s: float) -> None:
    _exit_with_parent()
    buf = bytearray(total)
    view = memoryview(buf)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(timeout_s)
        q.put(("port", server.getsockname()[1]))
        for _ in range(rounds):
            conn, _ = server.accept()
            with conn:
                conn.settimeout(timeout_s)
                got = 0
                while got < total:
                    n = conn.recv_into(view[got:], total - got)
                    if not n:
                        raise ConnectionError(f"sender closed after {got} of {total} bytes")
                    got += n
                conn.sendall(b"k")
    from jaxpd.transfer.wire import crc32c

    q.put(("crc", crc32c(np.frombuffer(buf, np.uint8))))


def _grpc_receiver(q, mode: str, preset: str, dtype: str, tokens: int) -> None:
    """A gRPC server with one PushKV method: `bytes` counts messages; `plain` (KVChunk parsed by
    protobuf) and `kv` (raw frames, as the decode worker registers PushKV) check each piece and
    copy it into a host pool on one writer thread."""
    _exit_with_parent()
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from jaxpd.serving.grpc_server import channel_options
    from jaxpd.transfer import wire
    from jaxpd.v1 import worker_pb2

    status = {"precondition": grpc.StatusCode.FAILED_PRECONDITION,
              "data_loss": grpc.StatusCode.DATA_LOSS, "invalid": grpc.StatusCode.INVALID_ARGUMENT}
    layout = layout_for(preset, dtype)
    ctx = wire.WireContext(FINGERPRINT, layout)
    pool = np.zeros(kv_shape(layout, tokens), wire.WIRE_DTYPES[dtype]) if mode != "bytes" else None
    writer = ThreadPoolExecutor(1, thread_name_prefix="pool-writer")
    puller = None
    if mode == "jax":  # pull frames: fetch from the sender's JAX transfer server
        import jax

        from jaxpd.transfer.jax_plane import JaxKVPuller

        puller = JaxKVPuller(jax.devices()[0])

    def store(piece) -> None:
        h = piece.header
        np.copyto(raw_view(pool[h.layer_start:h.layer_end, :, :, h.token_start:h.token_end]),
                  raw_view(piece.array))

    def digest(request_id: str) -> worker_pb2.KVAck:
        crc = crc_of(pool)
        pool.fill(0)  # the next case must write every byte again to pass its check
        return worker_pb2.KVAck(request_id=str(crc), bytes=pool.nbytes)

    def unpack(message):
        if mode == "plain":  # protobuf already parsed it (and copied `data` into a new bytes)
            return message.header, memoryview(message.data)
        return wire.parse_frame(message)

    async def push_bytes(messages, context):
        count = received = 0
        async for raw in messages:
            received += len(raw)
            count += 1
        return worker_pb2.KVAck(request_id="bytes", bytes=received, messages=count)

    async def push_kv(messages, context):
        loop = asyncio.get_running_loop()
        count = received = 0
        pending = []
        async for message in messages:
            try:
                header, payload = unpack(message)
                if header.request_id == DIGEST_ID:
                    await asyncio.gather(*pending)
                    return await loop.run_in_executor(writer, digest, header.request_id)
                if header.HasField("pull"):
                    wire.check_pull(ctx, header)
                    piece = await puller.pull(header, 300.0)
                else:
                    piece = wire.check_piece(ctx, header, payload)
            except wire.WireError as e:
                await context.abort(status.get(e.kind, grpc.StatusCode.ABORTED), str(e))
            count += 1
            if piece.array is not None:
                pending.append(loop.run_in_executor(writer, store, piece))
                received += piece.array.nbytes
            if header.HasField("finish"):
                await asyncio.gather(*pending)
                return worker_pb2.KVAck(request_id=header.request_id, bytes=received,
                                        messages=count)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended without a finish")

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *channel_options()])
        # registered as decode_worker.kv_transfer_handler registers it (raw frames in)
        push_kv_method = grpc.stream_unary_rpc_method_handler(
            push_bytes if mode == "bytes" else push_kv,
            request_deserializer=worker_pb2.KVChunk.FromString if mode == "plain" else None,
            response_serializer=worker_pb2.KVAck.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "jaxpd.v1.KVTransfer", {"PushKV": push_kv_method}),))
        port = server.add_insecure_port("127.0.0.1:0")
        if not port:
            raise RuntimeError("cannot bind a port on 127.0.0.1")
        await server.start()
        # terminate(): stop the server (closing its port and calls) instead of dying mid-call
        stopping = []
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, lambda: stopping.append(asyncio.ensure_future(server.stop(0))))
        q.put(("port", port))
        try:
            await server.wait_for_termination()
        finally:
            await server.stop(0)

    try:
        asyncio.run(main())
    finally:
        writer.shutdown(wait=False, cancel_futures=True)


def _tcp_receiver(q, preset: str, dtype: str, tokens: int, scheme: str = "tcp://") -> None:
    """jaxpd's tcp data plane (`TcpKVServer`: frames read with recv_into into two reused
    buffers), each piece checked as the decode worker checks it and copied into a host pool."""
    _exit_with_parent()
    import grpc

    from jaxpd.transfer import wire
    from jaxpd.transfer.tcp_plane import TcpKVServer
    from jaxpd.v1 import worker_pb2

    status = {"precondition": grpc.StatusCode.FAILED_PRECONDITION,
              "data_loss": grpc.StatusCode.DATA_LOSS, "invalid": grpc.StatusCode.INVALID_ARGUMENT}
    layout = layout_for(preset, dtype)
    ctx = wire.WireContext(FINGERPRINT, layout)
    pool = np.zeros(kv_shape(layout, tokens), wire.WIRE_DTYPES[dtype])

    class Intake:
        def __init__(self):
            self.count = self.received = 0

        async def take(self, raw, verify_crc=True):
            header, payload = wire.parse_frame(raw)
            if header.request_id == DIGEST_ID:
                crc = crc_of(pool)
                pool.fill(0)
                return None, worker_pb2.KVAck(request_id=str(crc), bytes=pool.nbytes)
            piece = wire.check_piece(ctx, header, payload, verify_crc=verify_crc)
            self.count += 1
            if piece.array is not None:  # the one copy, out of the reused buffer into the pool
                h = piece.header
                np.copyto(raw_view(pool[h.layer_start:h.layer_end, :, :,
                                        h.token_start:h.token_end]), raw_view(piece.array))
                self.received += piece.array.nbytes
            if header.HasField("finish"):
                return None, worker_pb2.KVAck(request_id=header.request_id,
                                              bytes=self.received, messages=self.count)
            return None, None

        def failed(self, e):
            return status[e.kind], str(e)

        def cancelled(self, why):
            pass

    async def main() -> None:
        server = TcpKVServer("127.0.0.1", Intake, (64 << 20) + (1 << 16), (wire.WireError,),
                             scheme=scheme)
        address = await server.start()
        q.put(("port", address))
        await asyncio.Event().wait()

    asyncio.run(main())


def time_tcp(address: str, ctx, kv: np.ndarray, rounds: int, timeout_s: float,
             shared_memory: bool = False) -> tuple[list[float], int]:
    """jaxpd's tcp (or shm) sender (`TcpKVSender`, pooled connection) as the prefill worker
    runs it."""
    from jaxpd.transfer.tcp_plane import TcpKVSender

    async def run() -> tuple[list[float], int]:
        sender = TcpKVSender(ctx, timeout_s, shared_memory=shared_memory)
        times, messages = [], 0
        for i in range(rounds):
            start = time.perf_counter()
            stream = sender.open(address, f"r{i}")
            await stream.send_tokens(kv, 0, 0, kv.shape[3])
            ack = await stream.finish(kv.shape[3], 0, 0.0)
            times.append(time.perf_counter() - start)
            if ack.bytes != kv.nbytes:
                raise AssertionError(f"tcp_kv: the receiver got {ack.bytes} of {kv.nbytes} bytes")
            messages = ack.messages
        crc = int((await sender.open(address, DIGEST_ID).finish(0, 0, 0.0)).request_id)
        sender.close()
        if crc != crc_of(kv):
            raise AssertionError("tcp_kv: the receiver's pool differs from the KV sent")
        return times, messages

    return asyncio.run(run())


class Receiver:
    """A receiver in a spawned process; always stopped on leaving the `with` block."""

    def __init__(self, target, *args):
        spawn = mp.get_context("spawn")
        self.queue = spawn.Queue()
        self.proc = spawn.Process(target=target, args=(self.queue, *args), daemon=True,
                                  name=f"bench-transfer-{target.__name__.strip('_')}")

    def __enter__(self) -> Self:
        self.proc.start()
        try:
            self.port = self.get("port", START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def get(self, key: str, timeout_s: float):
        """The child's next `(key, value)` report; fails fast if the child died."""
        import queue

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                got, value = self.queue.get(timeout=0.2)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"{self.proc.name} exited (code {self.proc.exitcode}) "
                                       f"before reporting {key!r}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.proc.name}: no {key!r} within "
                                       f"{timeout_s:.0f} s") from None
                continue
            if got != key:
                raise RuntimeError(f"{self.proc.name} reported {got!r}, expected {key!r}")
            return value

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.queue.close()
        self.queue.join_thread()


# -- senders -----------------------------------------------------------------------------------
def time_socket(port: int, buffers: list[memoryview], rounds: int, timeout_s: float) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
            for buf in buffers:
                conn.sendall(buf)
            if conn.recv(1) != b"k":
                raise ConnectionError("raw socket receiver closed without its ack")
        times.append(time.perf_counter() - start)
    return times


def _header(ctx, request_id: str, l0: int, l1: int, t0: int, t1: int, block: np.ndarray, crc: int):
    from jaxpd.v1 import worker_pb2

    return worker_pb2.KVHeader(
        request_id=request_id, layer_start=l0, layer_end=l1, token_start=t0, token_end=t1,
        head_start=0, head_end=ctx.layout.model_kv_heads, dtype=ctx.layout.dtype,
        shape=block.shape, model_fingerprint=ctx.fingerprint, crc32c=crc)


def _finish_header(ctx, request_id: str, tokens: int):
    from jaxpd.transfer import wire
    from jaxpd.v1 import worker_pb2

    return worker_pb2.KVHeader(request_id=request_id, dtype=ctx.layout.dtype,
                               model_fingerprint=ctx.fingerprint, crc32c=wire.crc32c(b""),
                               finish=worker_pb2.KVFinish(num_tokens=tokens))


def _open(channel, serializer, timeout_s: float):
    """A PushKV call on `channel` (`serializer` None: raw bytes, as jaxpd's sender writes)."""
    from jaxpd.transfer.grpc_stream import PUSH_KV
    from jaxpd.v1 import worker_pb2

    method = channel.stream_unary(PUSH_KV, request_serializer=serializer,
                                  response_deserializer=worker_pb2.KVAck.FromString)
    return method(timeout=timeout_s)


async def _push_bytes(channel, blobs: list[bytes], timeout_s: float):
    """Ready-made messages, no serializer: what grpcio moves by itself."""
    call = _open(channel, None, timeout_s)
    for blob in blobs:
        await call.write(blob)
    await call.done_writing()
    return await call


async def _push_plain(channel, ctx, kv: np.ndarray, request_id: str, timeout_s: float):
    """The plain way: payload to `bytes`, CRC, protobuf message, protobuf serialization."""
    from jaxpd.transfer import wire
    from jaxpd.v1 import worker_pb2

    call = _open(channel, worker_pb2.KVChunk.SerializeToString, timeout_s)
    for l0, l1, t0, t1 in split(ctx, kv.shape[3]):
        block = kv[l0:l1, :, :, t0:t1]
        data = block.tobytes()
        header = _header(ctx, request_id, l0, l1, t0, t1, block, wire.crc32c(data))
        await call.write(worker_pb2.KVChunk(header=header, data=data))
    await call.write(worker_pb2.KVChunk(header=_finish_header(ctx, request_id, kv.shape[3])))
    await call.done_writing()
    return await call


async def _push_kv(channel, ctx, kv: np.ndarray, request_id: str, timeout_s: float):
    """jaxpd's sender as the prefill worker runs it (`GrpcKVSender.open` on our channel)."""
    from jaxpd.transfer.grpc_stream import GrpcKVStream

    call = _open(channel, None, timeout_s)
    stream = GrpcKVStream(ctx, call, request_id)
    await stream.send_tokens(kv, 0, 0, kv.shape[3])
    return await stream.finish(kv.shape[3], 0, 0.0)


async def _push_jax(channel, ctx, kv, request_id: str, timeout_s: float):
    """serving.transport: jax as the prefill worker runs it: `kv` (already on the device, as
    a gather leaves it) offered on this process's transfer server, one pull frame on PushKV."""
    from jaxpd.transfer.grpc_stream import GrpcKVStream
    from jaxpd.transfer.jax_plane import JaxKVStream

    call = _open(channel, None, timeout_s)
    stream = JaxKVStream(_JAX_SENDER[0], GrpcKVStream(ctx, call, request_id))
    await stream.send_tokens(kv, 0, 0, kv.shape[3])
    return await stream.finish(kv.shape[3], 0, 0.0)


_JAX_SENDER: list = []  # one JaxKVSender (one transfer server) for the whole run


async def _ask_digest(channel, mode: str, ctx, timeout_s: float) -> int:
    """The receiver pool's CRC-32C (then zeroed), over the same method, outside the clock."""
    from jaxpd.transfer import wire
    from jaxpd.v1 import worker_pb2

    header = _finish_header(ctx, DIGEST_ID, 0)
    if mode == "plain":
        message = worker_pb2.KVChunk(header=header)
        serializer = worker_pb2.KVChunk.SerializeToString
    else:
        message, serializer = wire.frame(header), None
    call = _open(channel, serializer, timeout_s)
    await call.write(message)
    await call.done_writing()
    return int((await call).request_id)


def time_grpc(port: int, mode: str, ctx, kv: np.ndarray, rounds: int,
              timeout_s: float) -> tuple[list[float], int]:
    """Seconds of each round, and the messages of one; checks every ack and the final copy."""
    from jaxpd.serving.grpc_server import new_channel

    blobs = None
    if mode == "jax":  # on the device before the clock, where a prefill worker's gather is
        import jax.numpy as jnp

        from jaxpd.transfer.jax_plane import JaxKVSender

        if not _JAX_SENDER:
            _JAX_SENDER.append(JaxKVSender(ctx, timeout_s))
        _JAX_SENDER[0].ctx = ctx
        device_kv = jnp.asarray(kv)
    if mode == "bytes":  # built before the clock: this case times grpcio alone
        blobs = [raw_view(kv[l0:l1, :, :, t0:t1]).tobytes()
                 for l0, l1, t0, t1 in split(ctx, kv.shape[3])]

    async def run() -> tuple[list[float], int]:
        channel = new_channel(f"127.0.0.1:{port}")
        try:
            times, messages = [], 0
            for i in range(rounds):
                start = time.perf_counter()
                if mode == "bytes":
                    ack = await _push_bytes(channel, blobs, timeout_s)
                elif mode == "plain":
                    ack = await _push_plain(channel, ctx, kv, f"r{i}", timeout_s)
                elif mode == "jax":
                    ack = await _push_jax(channel, ctx, device_kv, f"r{i}", timeout_s)
                else:
                    ack = await _push_kv(channel, ctx, kv, f"r{i}", timeout_s)
                times.append(time.perf_counter() - start)
                if ack.bytes != kv.nbytes:
                    raise AssertionError(f"grpc_{mode}: the receiver got {ack.bytes} of "
                                         f"{kv.nbytes} bytes")
                messages = ack.messages
            if mode != "bytes":
                crc = await _ask_digest(channel, mode, ctx, timeout_s)
                if crc != crc_of(kv):
                    raise AssertionError(f"grpc_{mode}: the receiver's pool differs from the "
                                         f"KV sent")
            return times, messages
        finally:
            await channel.close()

    return asyncio.run(run())


def _row(times: list[float], nbytes: int, messages: int) -> dict:
    median = statistics.median(times)
    return {"seconds": round(median, 5), "gb_per_s": round(nbytes / median / 1e9, 3),
            "bytes": int(nbytes), "messages": int(messages), "runs_s": [round(t, 5) for t in times]}


def _record(result: dict, name: str, mib: int, times: list[float], messages: int, nbytes: int,
            raw: dict) -> None:
    """One case's row (the warm-up run dropped), its summary entry and its progress line."""
    row = _row(times[1:], nbytes, messages)
    row["message_mib"] = mib
    row["ratio_to_raw"] = round(row["gb_per_s"] / raw["gb_per_s"], 3)
    result["cases"][f"{name}_{mib}mib"] = row
    result["summary"][name][f"{mib}mib"] = row["gb_per_s"]
    print(f"{name} {mib} MiB: {row['gb_per_s']} GB/s ({row['seconds']} s, {messages} messages, "
          f"{row['ratio_to_raw']}x raw)", file=sys.stderr)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("numpy", "grpcio", "protobuf", "google-crc32c"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b", help="model whose KV layout is sent")
    ap.add_argument("--tokens", type=_positive, default=None,
                    help=f"prompt tokens of KV (default {DEFAULTS['tokens']})")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--message-mib", type=_mib_list, default=None, metavar="A,B,...",
                    help="gRPC message sizes to sweep (default 1,4,16,64)")
    ap.add_argument("--repeats", type=_positive, default=None,
                    help=f"timed runs per case after one warm-up (default {DEFAULTS['repeats']})")
    ap.add_argument("--cases",
                    default="raw_socket,grpc_bytes,grpc_plain,grpc_kv,tcp_kv,shm_kv,jax_kv",
                    help="comma-separated subset of the cases (raw_socket always runs)")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="deadline of one transfer")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 256 tokens, 1 repeat, 4 MiB messages (unless given)")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    known = ("grpc_bytes", "grpc_plain", "grpc_kv", "tcp_kv", "shm_kv", "jax_kv")
    wanted = {c.strip() for c in args.cases.split(",") if c.strip()} - {"raw_socket"}
    if wanted - set(known):
        ap.error(f"--cases: unknown {sorted(wanted - set(known))}; choose from raw_socket, "
                 f"{', '.join(known)}")

    # SIGTERM/SIGHUP run the `finally`/`with` blocks that stop the receivers
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))

    from jaxpd.transfer import wire

    layout = layout_for(args.preset, args.dtype)
    kv = kv_array(layout, args.tokens)
    rounds = args.repeats + 1  # the first is the warm-up
    result = {
        "benchmark": "kv_transfer_loopback",
        "command": shlex.join(sys.orig_argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": "cpu",
        "host": {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
                 "platform": platform.platform(), "machine": platform.machine(),
                 "hostname": socket.gethostname(), **_versions()},
        "kv": {"preset": args.preset, "dtype": args.dtype, "tokens": args.tokens,
               "shape": list(kv.shape), "bytes": int(kv.nbytes)},
        "repeats": args.repeats, "warmup_runs": 1, "message_mib": args.message_mib,
        "cases": {}, "summary": {},
    }
    print(f"KV {list(kv.shape)} {args.dtype}: {kv.nbytes / 1e6:.1f} MB, {args.repeats} timed "
          f"run(s) per case after a warm-up", file=sys.stderr)

    # raw: the KV's own memory in consecutive slices of the largest message size (no copies),
    # so the receiver's buffer ends up byte for byte the array
    flat, step = raw_view(kv).view(np.uint8).reshape(-1).data, max(args.message_mib) << 20
    parts = [flat[i:i + step] for i in range(0, len(flat), step)]
    with Receiver(_socket_receiver, int(kv.nbytes), rounds, args.timeout_s) as rx:
        times = time_socket(rx.port, parts, rounds, args.timeout_s)
        if rx.get("crc", args.timeout_s) != crc_of(kv):
            raise AssertionError("raw_socket: the receiver's buffer differs from the KV sent")
    raw = _row(times[1:], kv.nbytes, len(parts))
    raw["message_mib"] = max(args.message_mib)
    del parts, flat
    result["cases"]["raw_socket"] = raw
    result["summary"]["raw_socket"] = raw["gb_per_s"]
    print(f"raw_socket: {raw['gb_per_s']} GB/s ({raw['seconds']} s)", file=sys.stderr)

    for name in ("tcp_kv", "shm_kv"):  # jaxpd's data planes: same frames and checks, no gRPC
        if name not in wanted:
            continue
        result["summary"][name] = {}
        scheme = "shm://" if name == "shm_kv" else "tcp://"
        with Receiver(_tcp_receiver, args.preset, args.dtype, args.tokens, scheme) as rx:
            for mib in args.message_mib:
                ctx = wire.WireContext(FINGERPRINT, layout, mib << 20)
                times, messages = time_tcp(rx.port, ctx, kv, rounds, args.timeout_s,
                                           shared_memory=name == "shm_kv")
                _record(result, name, mib, times, messages, kv.nbytes, raw)

    for name in (c for c in known if c in wanted and (c.startswith("grpc_") or c == "jax_kv")):
        mode = name.removeprefix("grpc_").removesuffix("_kv") if name == "jax_kv" else \
            name.removeprefix("grpc_")
        result["summary"][name] = {}
        with Receiver(_grpc_receiver, mode, args.preset, args.dtype, args.tokens) as rx:
            for mib in args.message_mib if mode != "jax" else args.message_mib[:1]:  # 1 pull
                ctx = wire.WireContext(FINGERPRINT, layout, mib << 20)
                times, messages = time_grpc(rx.port, mode, ctx, kv, rounds, args.timeout_s)
                _record(result, name, mib, times, messages, kv.nbytes, raw)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
