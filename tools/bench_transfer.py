"""KV transfer throughput between two processes on loopback: jaxpd's gRPC KV stream beside a
plain protobuf stream and a raw TCP socket copy of the same bytes, in one run.

    python tools/bench_transfer.py                      # llama3-8b layout, bf16, 2048 tokens
    python tools/bench_transfer.py --tokens 512 --message-mib 4,16 --repeats 1
    python tools/bench_transfer.py --quick              # a few seconds, for a smoke run

Cases (the receiver is always a separate process; GB/s counts KV payload bytes, 1e9/s):
- `raw_socket`: `sendall` of the payload pieces, `recv_into` one preallocated buffer, 1-byte
  ack. The ceiling on this host.
- `grpc_bytes`: the same pieces as ready-made byte messages on a gRPC client stream, the
  receiver only counting them: what grpcio itself moves, with no framing or checks of ours.
- `grpc_plain`: a gRPC client stream of protobuf `KVChunk(header, data)` messages built and
  parsed by protobuf (`SerializeToString` / `FromString`); the receiver checks each CRC and
  copies the payload into a preallocated host pool.
- `grpc_kv`: jaxpd's path: the prefill side's `GrpcKVSender` (frames built off the event loop
  by `wire.encode_tokens`: one payload copy and the CRC), the receiver registered as the decode
  worker registers PushKV (raw frames in, `wire.parse_frame` + `wire.check_piece`, zero-copy
  payload view), each piece copied into the host pool; the finish message is acknowledged.
Each gRPC case runs at every `--message-mib`. Prints one JSON object (medians of `--repeats`
timed runs after one warm-up) with `ratio_to_raw` per gRPC case.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time

import numpy as np

FINGERPRINT = b"bench-transfer-0"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def layout_for(preset: str, dtype: str):
    from jaxpd.kv.layout import KVLayout
    from jaxpd.model.presets import get_preset

    cfg = get_preset(preset)
    return KVLayout(num_layers=cfg.num_layers, model_kv_heads=cfg.num_kv_heads, head_repeat=1,
                    head_dim=cfg.head_dim, page_size=16, dtype=dtype, tp=1)


def kv_array(layout, tokens: int, seed: int = 0) -> np.ndarray:
    from jaxpd.transfer.wire import WIRE_DTYPES

    shape = (layout.num_layers, 2, layout.model_kv_heads, tokens, layout.head_dim)
    return np.random.default_rng(seed).standard_normal(shape, np.float32).astype(WIRE_DTYPES[layout.dtype])


def pieces(kv: np.ndarray, ctx) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """The (ranges, contiguous payload) pieces `encode_tokens` would send, for the baselines."""
    from jaxpd.transfer.wire import split_ranges

    tokens = kv.shape[3]
    return [((l0, l1, t0, t1), np.ascontiguousarray(kv[l0:l1, :, :, t0:t1]))
            for l0, l1, t0, t1 in split_ranges(kv.shape[0], tokens, ctx.bytes_per_layer_token(),
                                               ctx.max_message_bytes)]


# -- receivers (run in a spawned process) -----------------------------------------------------
def _socket_receiver(port_q, total: int, rounds: int) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port_q.put(server.getsockname()[1])
        buf = memoryview(bytearray(total))
        for _ in range(rounds):
            conn, _ = server.accept()
            with conn:
                got = 0
                while got < total:
                    n = conn.recv_into(buf[got:], total - got)
                    if not n:
                        break
                    got += n
                conn.sendall(b"k")


def _grpc_receiver(port_q, preset: str, dtype: str, tokens: int, mode: str) -> None:
    import grpc

    from jaxpd.serving.grpc_server import channel_options
    from jaxpd.transfer import wire
    from jaxpd.v1 import worker_pb2

    layout = layout_for(preset, dtype)
    ctx = wire.WireContext(FINGERPRINT, layout)
    pool = np.zeros((layout.num_layers, 2, layout.model_kv_heads, tokens, layout.head_dim),
                    wire.WIRE_DTYPES[dtype])

    def store(header, array) -> None:
        np.copyto(pool[header.layer_start:header.layer_end, :, :, header.token_start:header.token_end],
                  array)

    async def push_bytes(messages, context):
        count = received = 0
        async for raw in messages:
            received += len(raw)
            count += 1
        return worker_pb2.KVAck(bytes=received, messages=count)

    async def push_kv(frames, context):
        count = received = 0
        async for raw in frames:
            if mode == "plain":  # protobuf parsed it; check and copy like the real receiver does
                header, payload = raw.header, raw.data
                if wire.crc32c(payload) != header.crc32c:
                    await context.abort(grpc.StatusCode.DATA_LOSS, "crc")
                piece = wire.check_piece(ctx, header, memoryview(payload))
            else:
                piece = wire.check_piece(ctx, *wire.parse_frame(raw))
            if piece.array is not None:
                store(piece.header, piece.array)
                received += piece.array.nbytes
            count += 1
            if piece.header.HasField("finish"):
                return worker_pb2.KVAck(request_id=piece.header.request_id, bytes=received,
                                        messages=count)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no finish message")

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *channel_options()])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("jaxpd.v1.KVTransfer", {
            "PushKV": grpc.stream_unary_rpc_method_handler(
                push_bytes if mode == "bytes" else push_kv,
                request_deserializer=worker_pb2.KVChunk.FromString if mode == "plain" else None,
                response_serializer=worker_pb2.KVAck.SerializeToString)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def _start(target, *args) -> tuple[mp.Process, int]:
    spawn = mp.get_context("spawn")
    port_q = spawn.Queue()
    proc = spawn.Process(target=target, args=(port_q, *args), daemon=True)
    proc.start()
    return proc, port_q.get(timeout=120)


def _stop(proc: mp.Process) -> None:
    if proc.is_alive():
        proc.terminate()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()


# -- senders -----------------------------------------------------------------------------------
def time_socket(port: int, parts, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            for _, payload in parts:
                conn.sendall(payload.view(np.uint8).reshape(-1).data)
            assert conn.recv(1) == b"k"
        times.append(time.perf_counter() - start)
    return times


async def _push_kv(sender, address: str, kv: np.ndarray, request_id: str) -> None:
    stream = sender.open(address, request_id)
    await stream.send_tokens(kv, 0, 0, kv.shape[3])
    ack = await stream.finish(kv.shape[3], 0, 0.0)
    assert ack.bytes == kv.nbytes, (ack.bytes, kv.nbytes)


async def _push_plain(channel, ctx, parts, request_id: str) -> None:
    from jaxpd.transfer import wire
    from jaxpd.transfer.grpc_stream import PUSH_KV
    from jaxpd.v1 import worker_pb2

    call = channel.stream_unary(PUSH_KV, request_serializer=worker_pb2.KVChunk.SerializeToString,
                                response_deserializer=worker_pb2.KVAck.FromString)(timeout=600)
    for (l0, l1, t0, t1), payload in parts:
        data = payload.tobytes()
        header = worker_pb2.KVHeader(
            request_id=request_id, layer_start=l0, layer_end=l1, token_start=t0, token_end=t1,
            head_start=0, head_end=ctx.layout.model_kv_heads, dtype=ctx.layout.dtype,
            shape=payload.shape, model_fingerprint=ctx.fingerprint, crc32c=wire.crc32c(data))
        await call.write(worker_pb2.KVChunk(header=header, data=data))
    finish = worker_pb2.KVHeader(request_id=request_id, dtype=ctx.layout.dtype,
                                 model_fingerprint=ctx.fingerprint, crc32c=wire.crc32c(b""),
                                 finish=worker_pb2.KVFinish(num_tokens=parts[-1][0][3]))
    await call.write(worker_pb2.KVChunk(header=finish))
    await call.done_writing()
    ack = await call
    assert ack.bytes == sum(p.nbytes for _, p in parts)


async def _push_bytes(channel, parts) -> None:
    from jaxpd.transfer.grpc_stream import PUSH_KV
    from jaxpd.v1 import worker_pb2

    call = channel.stream_unary(PUSH_KV, request_serializer=None,
                                response_deserializer=worker_pb2.KVAck.FromString)(timeout=600)
    for payload in parts:
        await call.write(payload)
    await call.done_writing()
    await call


def time_grpc(port: int, ctx, kv: np.ndarray, parts, mode: str, rounds: int) -> list[float]:
    """One channel for every round, as a prefill worker keeps one per decode worker."""
    from jaxpd.serving.grpc_server import new_channel
    from jaxpd.transfer.grpc_stream import GrpcKVSender

    address = f"127.0.0.1:{port}"

    blobs = [p.tobytes() for _, p in parts] if mode == "bytes" else None

    async def run() -> list[float]:
        times, sender, channel = [], GrpcKVSender(ctx, timeout_s=600), new_channel(address)
        for i in range(rounds):
            start = time.perf_counter()
            if mode == "bytes":
                await _push_bytes(channel, blobs)
            elif mode == "plain":
                await _push_plain(channel, ctx, parts, f"r{i}")
            else:
                await _push_kv(sender, address, kv, f"r{i}")
            times.append(time.perf_counter() - start)
        await channel.close()
        return times

    return asyncio.run(run())


def _row(times: list[float], nbytes: int, messages: int) -> dict:
    median = statistics.median(times)
    return {"seconds": round(median, 4), "gb_per_s": round(nbytes / median / 1e9, 3),
            "messages": messages, "runs": [round(t, 4) for t in times]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b", help="model whose KV layout is sent")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--message-mib", type=_ints, default=[1, 4, 16, 64], metavar="A,B")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256 tokens, 1 repeat, 4 MiB messages")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.message_mib = 256, 1, [4]

    from jaxpd.transfer import wire

    layout = layout_for(args.preset, args.dtype)
    kv = kv_array(layout, args.tokens)
    result = {"command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
              "date": datetime.date.today().isoformat(), "device": "cpu",
              "host": {"nproc": os.cpu_count(), "platform": platform.platform()},
              "preset": args.preset, "dtype": args.dtype, "tokens": args.tokens,
              "bytes": int(kv.nbytes), "cases": {}}
    rounds = args.repeats + 1  # the first is a warm-up
    ctx_raw = wire.WireContext(FINGERPRINT, layout, max(args.message_mib) << 20)
    proc, port = _start(_socket_receiver, int(kv.nbytes), rounds)
    try:
        parts = pieces(kv, ctx_raw)
        result["cases"]["raw_socket"] = _row(time_socket(port, parts, rounds)[1:], kv.nbytes, len(parts))
    finally:
        _stop(proc)
    raw = result["cases"]["raw_socket"]["gb_per_s"]
    for mode in ("bytes", "plain", "kv"):
        name = f"grpc_{mode}"
        proc, port = _start(_grpc_receiver, args.preset, args.dtype, args.tokens, mode)
        try:
            for mib in args.message_mib:
                ctx = wire.WireContext(FINGERPRINT, layout, mib << 20)
                parts = pieces(kv, ctx)
                row = _row(time_grpc(port, ctx, kv, parts, mode, rounds)[1:], kv.nbytes, len(parts) + 1)
                row["ratio_to_raw"] = round(row["gb_per_s"] / raw, 3)
                result["cases"][f"{name}_{mib}mib"] = row
                print(f"{name} {mib} MiB: {row['gb_per_s']} GB/s", file=sys.stderr)
        finally:
            _stop(proc)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
