"""KV pushes against a real decode worker on loopback, over each transport (gRPC PushKV, and
the tcp data plane): KV from another model or with a bad checksum is refused and never
written; a wrong token writes nothing and leaves the request alone; every failure frees the
reserved pages."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import threading

import grpc
import numpy as np
import pytest

from conftest import HF_FIXTURES
from jaxpd.config import parse_config
from jaxpd.engine.builder import build_engine
from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.model.checkpoint import load_model
from jaxpd.serving.convert import engine_request_to_pb
from jaxpd.serving.decode_worker import (DecodeScheduler, DecodeServicer, KVIntake,
                                         TransferError, kv_transfer_handler)
from jaxpd.transfer.tcp_plane import TcpKVServer
from jaxpd.serving.engine_thread import EngineThread
from jaxpd.serving.grpc_server import start_server
from jaxpd.transfer.grpc_stream import PUSH_KV
from jaxpd.serving.worker_common import WorkerState
from jaxpd.transfer import wire
from jaxpd.v1 import worker_pb2, worker_pb2_grpc

PROMPT = tuple(range(3, 13))


class PushFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str = ""):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class DecodeWorker:
    """A decode worker's servicer, engine thread and server (and, for tcp, its data plane), on
    an event loop in a thread."""

    def __init__(self, model, deployment):
        engine = build_engine(model.config, model.params, deployment)
        self.layout = engine.decode.manager.layout
        self.ctx = wire.WireContext(wire.model_fingerprint(model.config, model.params), self.layout)
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.address = self._run(self._start(model, deployment))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self, model, deployment):
        state = WorkerState("decode", 0, deployment, self.engine, model.config, self.ctx)
        scheduler = DecodeScheduler(self.engine, self.ctx, record_digests=True,
                                    kv_timeout_s=deployment.serving.kv_timeout_s)
        self.thread = EngineThread("decode", scheduler.has_work, scheduler.step,
                                   scheduler.fail_all, asyncio.get_running_loop(),
                                   tick=scheduler.tick, snapshot=scheduler.load, tick_s=0.05)
        servicer = DecodeServicer(state, scheduler, self.thread)

        def register(server):
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
            server.add_generic_rpc_handlers((kv_transfer_handler(servicer),))

        self.server = await start_server("127.0.0.1", 0, key="decode.port", where="test",
                                         services=[], register=register)
        state.address = self.server.address
        self.data_plane = None
        if deployment.serving.transport in ("tcp", "shm"):
            self.data_plane = TcpKVServer("127.0.0.1", lambda: KVIntake(servicer, copy=True),
                                          deployment.serving.kv_message_bytes + (1 << 16),
                                          (wire.WireError, TransferError),
                                          scheme=f"{deployment.serving.transport}://")
            state.data_address = await self.data_plane.start()
        if deployment.serving.transport == "jax":
            state.data_address = "jax://" + self.server.address
        self.transport = deployment.serving.transport
        self.data_address = state.data_address
        self.thread.start()
        await self.server.set_serving()
        return self.server.address

    def push(self, frames: list[bytes], *, finish: bool = True):
        """Send `frames` as one push over this worker's transport: the KVAck, or PushFailed
        with the receiver's status. Without `finish` the sender goes away mid-push."""
        if self.transport == "jax":  # each payload offered for pulling; its frame names it
            frames = [_as_pull(f) for f in frames]
        if self.transport in ("grpc", "jax"):
            _, push = _stubs(self.address)
            try:
                return push(iter(frames), timeout=30)
            except grpc.RpcError as e:
                raise PushFailed(e.code(), e.details()) from None
        if self.transport == "shm":  # frames through the sender's shared-memory slots
            from jaxpd.transfer.tcp_plane import TcpKVSender, TransferFailed

            async def run():
                sender = TcpKVSender(self.ctx, 30.0, shared_memory=True)
                stream = sender.open(self.data_address, "raw")
                try:
                    if not finish:
                        for f in frames:
                            await stream._send(f)
                        # let the receiver take them before the segment goes away with the
                        # sender (had it never read one, the request would only time out)
                        await asyncio.sleep(0.5)
                        stream.cancel()
                        return None
                    return await stream.push_frames(frames)
                except TransferFailed as e:
                    raise PushFailed(e.code(), e.details()) from None
                finally:
                    stream.cancel()
                    sender.close()
            return self._run(run())
        host, port = self.data_address.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            try:
                for f in frames:
                    sock.sendall(struct.pack(">cQ", b"K", len(f)) + f)
            except OSError:
                pass  # refused early: the answer says why
            if not finish:
                return None
            head = _read(sock, 9)
            kind, length = struct.unpack(">cQ", head)
            body = _read(sock, length)
        if kind == b"A":
            return worker_pb2.KVAck.FromString(body)
        error = json.loads(body)
        raise PushFailed(grpc.StatusCode[error["code"]], error["message"])

    def stop(self):
        if self.data_plane is not None:
            self._run(self.data_plane.stop())
        self._run(self.server.stop(0))
        self.thread.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)


_OFFERS = None  # this test process's JAX transfer server (the prefill side of a jax push)


def _as_pull(raw: bytes) -> bytes:
    """A data frame as serving.transport: jax sends it: its payload offered on a transfer
    server, the frame carrying only the header and where to pull."""
    global _OFFERS
    import secrets

    import jax.numpy as jnp

    from jaxpd.transfer.jax_plane import _TransferServer

    header, payload = wire.parse_frame(raw)
    if not len(payload):
        return raw
    if _OFFERS is None:
        _OFFERS = _TransferServer()
    server = _OFFERS.get()
    dtype = wire.WIRE_DTYPES.get(header.dtype, np.dtype(np.float32))
    uuid = secrets.randbits(63)
    server.await_pull(uuid, [jnp.asarray(np.frombuffer(payload, dtype).reshape(header.shape))])
    pull = worker_pb2.KVHeader()
    pull.CopyFrom(header)
    pull.crc32c = wire.crc32c(b"")
    pull.pull.CopyFrom(worker_pb2.KVPull(address=server.address(), uuid=uuid, offset=0))
    return wire.frame(pull, b"")


def _read(sock, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise PushFailed(grpc.StatusCode.UNAVAILABLE, "the data plane closed")
        out += chunk
    return out


@pytest.fixture(scope="module")
def model():
    return load_model(HF_FIXTURES / "llama")


def _deployment(kv_dtype: str = "auto", **serving):
    return parse_config({"kv": {"page_size": 4, "num_pages": 32, "dtype": kv_dtype},
                         "serving": serving})


@pytest.fixture(scope="module", params=["grpc", "tcp", "shm", "jax"])
def worker(model, request):
    w = DecodeWorker(model, _deployment(transport=request.param))
    yield w
    w.stop()


def _stubs(address):
    channel = grpc.insecure_channel(address)
    push = channel.stream_unary(PUSH_KV, request_serializer=None,
                                response_deserializer=worker_pb2.KVAck.FromString)
    return worker_pb2_grpc.DecodeWorkerStub(channel), push


def _reserve(stub, rid):
    req = engine_request_to_pb(Request(rid, PROMPT, SamplingParams(max_tokens=4, ignore_eos=True)), 0,
                               token=f"token-{rid}")
    call = stub.Decode(worker_pb2.DecodeRequest(request=req), timeout=30)
    assert next(call).HasField("reserved")
    return call


def _frames(ctx, rid, kv, token=None):
    token = f"token-{rid}" if token is None else token
    frames = list(wire.encode_tokens(ctx, rid, kv, 0, 0, len(PROMPT), token))
    return frames + [wire.finish_frame(ctx, rid, len(PROMPT), 7, -0.5, token)]


def _kv(layout, seed=0):
    shape = (layout.num_layers, 2, layout.model_kv_heads, len(PROMPT), layout.head_dim)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _pages_used(stub):
    return stub.GetLoad(worker_pb2.GetLoadRequest()).kv_pages_used


def _wait_pages_free(stub, within: float = 2.0) -> int:
    """Pages in use once the load snapshot caught up (it is published after each step)."""
    deadline = time.monotonic() + within
    while _pages_used(stub) and time.monotonic() < deadline:
        time.sleep(0.02)
    return _pages_used(stub)


def _pool_is_zero(worker):
    return all(not np.asarray(pages).any() for pages in worker.engine.decode.manager.kv)


@pytest.mark.parametrize("corrupt, code", [
    ("fingerprint", grpc.StatusCode.FAILED_PRECONDITION),
    ("crc", grpc.StatusCode.DATA_LOSS),
    ("dtype", grpc.StatusCode.FAILED_PRECONDITION),
])
def test_refused_kv_is_never_written_and_frees_the_reservation(worker, corrupt, code):
    if corrupt == "crc" and worker.transport in ("jax", "shm"):
        pytest.skip("no CRC-32C to break: jax pulls device buffers, shm frames never leave "
                    "this host's memory")
    stub, push = _stubs(worker.address)
    call = _reserve(stub, f"bad-{corrupt}")
    assert _pages_used(stub) > 0
    frames = _frames(worker.ctx, f"bad-{corrupt}", _kv(worker.layout))
    header, payload = wire.parse_frame(frames[0])
    if corrupt == "fingerprint":
        header.model_fingerprint = b"\x00" * 16
    elif corrupt == "dtype":
        header.dtype = "float64"  # no KV dtype
    else:
        payload = bytearray(payload)
        payload[3] ^= 1
    frames[0] = wire.frame(header, bytes(payload))
    with pytest.raises(PushFailed) as e:
        worker.push(frames)
    assert e.value.code() == code
    with pytest.raises(grpc.RpcError) as e:  # the Decode stream ends with the same status
        list(call)
    assert e.value.code() == code
    assert _wait_pages_free(stub) == 0 and _pool_is_zero(worker)


def test_good_kv_is_written_byte_exact_then_decoding_streams(worker):
    stub, push = _stubs(worker.address)
    call = _reserve(stub, "good")
    kv = _kv(worker.layout, seed=1)
    ack = worker.push(_frames(worker.ctx, "good", kv))
    assert ack.request_id == "good" and ack.messages >= 2
    assert next(call).HasField("kv_received")
    tokens = [t for ev in call for t in ev.tokens.token_ids]
    assert len(tokens) == 3  # the first of max_tokens=4 came with the KV
    digest = worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(worker.address)).GetKVDigests(
        worker_pb2.KVDigestsRequest(request_ids=["good"])).digests["good"]
    assert digest.crc32c == wire.crc32c(np.ascontiguousarray(kv).tobytes())
    assert _wait_pages_free(stub) == 0


def test_kv_with_a_wrong_token_is_refused_and_the_request_goes_on(worker):
    """A forged push (another request's id, a guessed token) writes nothing and does not end
    the request it names; the real push then succeeds."""
    stub, push = _stubs(worker.address)
    call = _reserve(stub, "target")
    before = [np.asarray(pages).copy() for pages in worker.engine.decode.manager.kv]
    with pytest.raises(PushFailed) as e:
        worker.push(_frames(worker.ctx, "target", _kv(worker.layout, seed=5), token="guess"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    after = [np.asarray(pages) for pages in worker.engine.decode.manager.kv]
    assert all((a == b).all() for a, b in zip(before, after)) and _pages_used(stub) > 0
    ack = worker.push(_frames(worker.ctx, "target", _kv(worker.layout, seed=2)))
    assert ack.request_id == "target"
    assert len([t for ev in call for t in ev.tokens.token_ids]) == 3
    assert _wait_pages_free(stub) == 0


def test_kv_for_an_unknown_request_is_not_found(worker):
    with pytest.raises(PushFailed) as e:
        worker.push(_frames(worker.ctx, "nobody", _kv(worker.layout)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_push_cut_off_before_its_finish_aborts_the_request(worker):
    """The sender stops mid-push (a gRPC stream ending without finish, a data-plane
    connection closed): the request fails ABORTED, which the router moves elsewhere."""
    stub, _ = _stubs(worker.address)
    call = _reserve(stub, "unfinished")
    frames = _frames(worker.ctx, "unfinished", _kv(worker.layout))[:-1]
    if worker.transport in ("grpc", "jax"):
        with pytest.raises(PushFailed) as e:
            worker.push(frames)
        assert e.value.code() == grpc.StatusCode.ABORTED
    else:
        worker.push(frames, finish=False)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert _wait_pages_free(stub) == 0


def test_the_sender_class_pools_connections_and_reports_refusals(worker):
    """The prefill side's sender for this transport: two pushes in a row (the tcp one reuses
    its connection), then a refused one surfaces the receiver's status."""
    from jaxpd.transfer.grpc_stream import GrpcKVSender
    from jaxpd.transfer.tcp_plane import TcpKVSender

    stub, _ = _stubs(worker.address)
    from jaxpd.transfer.jax_plane import JaxKVSender

    sender = (GrpcKVSender(worker.ctx, 30.0) if worker.transport == "grpc" else
              JaxKVSender(worker.ctx, 30.0) if worker.transport == "jax" else
              TcpKVSender(worker.ctx, 30.0, shared_memory=worker.transport == "shm"))
    target = worker.data_address or worker.address

    async def push(rid, token):
        stream = sender.open(target, rid, token)
        await stream.send_tokens(_kv(worker.layout, seed=3), 0, 0, len(PROMPT))
        return await stream.finish(len(PROMPT), 7, -0.5)
    for rid in ("pooled-1", "pooled-2"):
        call = _reserve(stub, rid)
        assert worker._run(push(rid, f"token-{rid}")).request_id == rid
        assert len([t for ev in call for t in ev.tokens.token_ids]) == 3
    if worker.transport in ("tcp", "shm"):
        assert len(sender._idle[target]) == 1  # one connection served both
        sender.close()
    call = _reserve(stub, "forged")
    try:
        with pytest.raises(Exception) as e:
            worker._run(push("forged", "guess"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        call.cancel()
    assert _wait_pages_free(stub) == 0


def test_kv_that_never_arrives_times_out_and_frees_pages(model):
    w = DecodeWorker(model, _deployment(kv_timeout_s=0.3))
    try:
        stub, _ = _stubs(w.address)
        call = _reserve(stub, "late")
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "serving.kv_timeout_s" in e.value.details()
        assert _wait_pages_free(stub) == 0
    finally:
        w.stop()


@pytest.mark.parametrize("pool, sent", [("float8_e4m3fn", "float32"), ("int8", "float32"),
                                        ("int8", "int8")])
def test_a_decode_pool_of_another_dtype_stores_what_the_wire_names(model, pool, sent):
    """kv.dtype differs between the workers: the frames name the sender's dtype and the decode
    worker converts, byte for byte what its own storage rule gives: a float32 prefill into fp8
    (clipped to +-448) or int8 (rows quantized with their scales); int8 into int8 moves the
    rows and their scales unchanged."""
    import jax.numpy as jnp

    from jaxpd.kv.dtypes import KV_DTYPES, to_storage
    from jaxpd.kv.layout import KVLayout

    w = DecodeWorker(model, _deployment(kv_dtype=pool))
    try:
        assert w.layout.dtype == pool
        stub, _ = _stubs(w.address)
        call = _reserve(stub, "narrow")
        sender = wire.WireContext(w.ctx.fingerprint, KVLayout.for_model(
            model.config, tp=1, page_size=4, dtype=sent))
        kv = _kv(w.layout, seed=9) * 100  # some beyond e4m3's +-448
        on_wire = np.asarray(to_storage(jnp.asarray(kv), KV_DTYPES[sent]))
        w.push(_frames(sender, "narrow", on_wire))
        assert len([t for ev in call for t in ev.tokens.token_ids]) == 3
        digest = worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(w.address)) \
            .GetKVDigests(worker_pb2.KVDigestsRequest(request_ids=["narrow"])).digests["narrow"]
        want = np.asarray(to_storage(jnp.asarray(kv), KV_DTYPES[pool]))
        assert digest.bytes == want.size  # one byte per element (int8: and 4 per row's scale)
        assert digest.crc32c == wire.crc32c(np.ascontiguousarray(want).view(np.uint8))
    finally:
        w.stop()


def test_a_full_pool_is_resource_exhausted_and_the_worker_keeps_serving(worker):
    stub, push = _stubs(worker.address)
    long = tuple(range(3, 103))  # 100 tokens: 26 of the pool's 31 pages

    def decode(rid):
        req = engine_request_to_pb(Request(rid, long, SamplingParams(max_tokens=4)), 0)
        return stub.Decode(worker_pb2.DecodeRequest(request=req), timeout=30)

    holder = decode("holder")
    assert next(holder).HasField("reserved")
    with pytest.raises(grpc.RpcError) as e:
        next(decode("second"))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no free KV pages" in e.value.details()
    holder.cancel()
    deadline = time.monotonic() + 2
    while _pages_used(stub) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _wait_pages_free(stub) == 0
    third = decode("third")
    assert next(third).HasField("reserved")  # room again
    third.cancel()


def test_calls_cancelled_while_reserving_keep_no_pages(worker):
    """A Decode call cancelled at any moment around its reservation (before, during or right
    after the engine thread reserved) leaves no page behind."""
    stub, _ = _stubs(worker.address)
    calls = []
    for i in range(40):
        req = engine_request_to_pb(Request(f"c{i}", PROMPT, SamplingParams(max_tokens=4)), 0,
                                   token=f"token-c{i}")
        call = stub.Decode(worker_pb2.DecodeRequest(request=req), timeout=30)
        if i % 2:
            time.sleep(0.001 * (i % 7))
        call.cancel()
        calls.append(call)
    assert _wait_pages_free(stub) == 0


def test_a_data_plane_on_every_interface_advertises_a_name_peers_can_reach():
    """Listening on 0.0.0.0 (a pod): the address handed to prefill workers is this machine's
    name, not the wildcard, and it connects."""
    async def run():
        server = TcpKVServer("0.0.0.0", lambda: None, 1024, (ValueError,))
        advertised = await server.start()
        try:
            host, port = advertised.removeprefix("tcp://").rsplit(":", 1)
            assert host not in ("0.0.0.0", "") and advertised.startswith("tcp://")
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
        finally:
            await server.stop()
        explicit = TcpKVServer("127.0.0.1", lambda: None, 1024, (ValueError,),
                               advertise="decode-0.pods.example")
        assert (await explicit.start()).startswith("tcp://decode-0.pods.example:")
        await explicit.stop()
    asyncio.run(run())


def test_auto_picks_shared_memory_on_this_host_jax_between_accelerators_and_tcp_else():
    from jaxpd.transfer.tcp_plane import choose_transport, same_host

    assert same_host("auto://127.0.0.1:5000") and same_host("auto://localhost:5000")
    assert not same_host("auto://10.1.2.3:5000")
    assert not same_host("auto://no-such-host.invalid:5000")
    jax_too = "auto://10.1.2.3:5000?jax=10.1.2.3:6000"  # a decode worker on an accelerator
    assert choose_transport(jax_too, on_accelerator=True) == ("jax", "jax://10.1.2.3:6000")
    assert choose_transport(jax_too, on_accelerator=False) == ("tcp", "auto://10.1.2.3:5000")
    assert choose_transport("auto://127.0.0.1:5000?jax=127.0.0.1:6000", True) == \
        ("shm", "auto://127.0.0.1:5000")
    assert choose_transport("auto://10.1.2.3:5000", True) == ("tcp", "auto://10.1.2.3:5000")
    assert choose_transport("10.1.2.3:6000", True) == ("grpc", "10.1.2.3:6000")
    assert choose_transport("shm://127.0.0.1:5000", False)[0] == "shm"


def test_blocks_the_decode_worker_holds_are_neither_sent_nor_overwritten(worker):
    """A prompt whose leading blocks are in the decode worker's prefix cache (a finished
    request left them there): the reservation says how many tokens it holds, a push of only
    the rest completes the KV, and a push from token 0 (a sender that ignores it) leaves the
    shared cached blocks untouched. The written KV is checked byte for byte."""
    stub, _ = _stubs(worker.address)
    first = tuple(range(40, 50))  # its first 8 tokens: two full pages of 4
    kv_first = _kv_of(worker.layout, len(first), seed=6)

    def reserve(rid, prompt):
        req = engine_request_to_pb(Request(rid, prompt, SamplingParams(max_tokens=2,
                                                                       ignore_eos=True)),
                                   0, token=f"token-{rid}")
        call = stub.Decode(worker_pb2.DecodeRequest(request=req), timeout=30)
        return call, next(call).reserved

    def frames(rid, prompt, kv, start):
        token = f"token-{rid}"
        return [*wire.encode_tokens(worker.ctx, rid, kv, start, start, len(prompt), token),
                wire.finish_frame(worker.ctx, rid, len(prompt), 7, -0.5, token)]

    call, reserved = reserve("holder", first)
    assert reserved.cached_tokens == 0
    worker.push(frames("holder", first, kv_first, 0))
    list(call)
    for rid, start, new in (("suffix-only", 8, 60), ("from-zero", 0, 70)):
        again = first[:8] + tuple(range(new, new + 8))  # 16 tokens sharing those two pages
        kv = _kv_of(worker.layout, len(again), seed=7)
        call, reserved = reserve(rid, again)
        assert reserved.cached_tokens == 8
        worker.push(frames(rid, again, kv, start))
        assert len([t for ev in call for t in ev.tokens.token_ids]) == 1
        digest = worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(worker.address)) \
            .GetKVDigests(worker_pb2.KVDigestsRequest(request_ids=[rid])).digests[rid]
        want = np.concatenate([kv_first[:, :, :, :8], kv[:, :, :, 8:]], axis=3)
        assert digest.crc32c == wire.crc32c(np.ascontiguousarray(want).tobytes()), rid
    assert _wait_pages_free(stub) == 0


def _kv_of(layout, tokens: int, seed: int) -> np.ndarray:
    shape = (layout.num_layers, 2, layout.model_kv_heads, tokens, layout.head_dim)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


_SILENT_PEER = """
import sys, time
import jax
from jax.experimental import transfer
server = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"])
print(server.address(), flush=True)
time.sleep(120)
"""


def test_a_jax_pull_that_never_completes_times_out_and_frees_pages(model):
    """serving.transport: jax, and the prefill worker holding the KV never hands it over
    (frozen, or it withdrew it): the pull is abandoned at the deadline, the push and the
    request fail ABORTED (the router moves them), and the pages are freed. The abandoned
    pull's thread ends once that peer goes away."""
    import subprocess
    import sys

    from serving_helpers import child_env

    peer = subprocess.Popen([sys.executable, "-c", _SILENT_PEER], stdout=subprocess.PIPE,
                            text=True, env=child_env())
    w = DecodeWorker(model, _deployment(transport="jax", kv_timeout_s=1.5))
    try:
        address = peer.stdout.readline().strip()
        assert address, "the peer's transfer server did not start"
        stub, push = _stubs(w.address)
        call = _reserve(stub, "never")
        frames = _frames(w.ctx, "never", _kv(w.layout))
        header, _ = wire.parse_frame(_as_pull(frames[0]))
        header.pull.address = address  # a live transfer server that never offers this id
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            push(iter([wire.frame(header, b""), frames[-1]]), timeout=30)
        assert e.value.code() == grpc.StatusCode.ABORTED and "pulling" in e.value.details()
        assert time.monotonic() - began < 10
        with pytest.raises(grpc.RpcError) as e:  # whichever deadline came first: both free
            list(call)
        assert e.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert _wait_pages_free(stub) == 0
    finally:
        peer.kill()
        peer.wait()
        w.stop()
    deadline = time.monotonic() + 20  # the abandoned pull ends with its peer
    while any(t.name == "kv-pull" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(t.name == "kv-pull" for t in threading.enumerate())
