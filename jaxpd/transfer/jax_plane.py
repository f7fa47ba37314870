"""KV through JAX's transfer server (`serving.transport: jax`, `jax.experimental.transfer`).

The prefill worker leaves each gathered chunk of KV on its device and offers it on its
process's transfer server (`await_pull` under a random 63-bit id); a header-only frame on the
request's ordinary PushKV stream tells the decode worker what to pull (`KVHeader.pull`: the
server's address, the id, shape and dtype), and the decode worker pulls it onto its own device,
device to device where the platform's transfer server allows, and writes it into its pool
without a host copy (padding and resharding happen on the device), through the same checks
and writes as every transport (its TP layout, its dtype). Leases, tokens, refusals and
migration are therefore PushKV's own.

What differs: the bytes carry no CRC-32C (checking them would copy them to the host, which is
what this transport exists to avoid; the transfer server's own connection carries them), and
the transfer server has no authentication or TLS, so like `tcp` it is refused beside
`internal_tls`. Every pull has a deadline enforced here: JAX 0.11's own pull timeout does not
fire on CPU (a pull of an id nobody offers waits until the peer's connection closes), so a pull
runs on a thread of its own and is abandoned, the request failing ABORTED, when the deadline
passes; that thread ends when the peer answers or goes away.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import socket
import threading

import jax

from jaxpd.transfer import wire
from jaxpd.transfer.grpc_stream import GrpcKVSender
from jaxpd.v1 import worker_pb2

SCHEME = "jax://"


def transfer_host(group_host: str, data_host: str | None) -> str:
    """Where a worker's transfer server listens, and so the address peers pull from:
    serving.data_host, else the group's host, else (a wildcard host) this machine's name."""
    if data_host:
        return data_host
    return group_host if group_host not in ("", "0.0.0.0", "::", "[::]") else socket.gethostname()


class _TransferServer:
    """This process's transfer server, started on first use (on `host`)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self._server = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._server is None:
                from jax.experimental import transfer

                client = jax.devices()[0].client
                self._server = transfer.start_transfer_server(
                    client, f"{self.host}:0", [f"{self.host}:0"])
            return self._server


class JaxKVSender:  # implements transfer.base.KVSender
    """The prefill side: PushKV streams whose frames say where to pull each chunk."""

    def __init__(self, ctx: wire.WireContext, timeout_s: float, host: str = "127.0.0.1"):
        self.ctx, self.timeout_s = ctx, timeout_s
        self.grpc = GrpcKVSender(ctx, timeout_s)
        self.server = _TransferServer(host)

    def open(self, target: str, request_id: str, token: str = "") -> JaxKVStream:
        """`target`: "jax://host:port", the decode worker's gRPC address."""
        return JaxKVStream(self, self.grpc.open(target.removeprefix(SCHEME), request_id, token))


class JaxKVStream:
    def __init__(self, sender: JaxKVSender, stream):
        self.sender, self._stream = sender, stream
        self.ctx, self.request_id, self.token = sender.ctx, stream.request_id, stream.token
        self.bytes = self.messages = 0

    async def send_tokens(self, array: jax.Array, offset: int, start: int, end: int) -> None:
        """Offer tokens [start, end) of a gathered array (still on device) for pulling."""
        server = self.sender.server.get()
        if not isinstance(array, jax.Array):
            array = jax.numpy.asarray(array)
        # one buffer on one device: a gather on a TP mesh spans its devices
        one = jax.device_put(array, min(array.sharding.device_set, key=lambda d: d.id))
        uuid = secrets.randbits(63)
        expires = datetime.datetime.now() + datetime.timedelta(seconds=self.sender.timeout_s)
        server.await_pull(uuid, [one], timeout=expires)
        layout = self.ctx.layout
        header = worker_pb2.KVHeader(
            request_id=self.request_id, layer_start=0, layer_end=layout.num_layers,
            token_start=start, token_end=end, head_start=0, head_end=layout.model_kv_heads,
            dtype=layout.dtype, shape=one.shape, model_fingerprint=self.ctx.fingerprint,
            crc32c=wire.crc32c(b""), request_token=self.token,
            pull=worker_pb2.KVPull(address=server.address(), uuid=uuid, offset=offset))
        await self._stream._write(wire.frame(header, b""))
        self.bytes += one.nbytes
        self.messages += 1

    async def finish(self, num_tokens: int, first_token: int, first_logprob: float):
        ack = await self._stream.finish(num_tokens, first_token, first_logprob)
        self.messages += 1
        return ack

    def cancel(self) -> None:
        self._stream.cancel()


class JaxKVPuller:
    """The decode side: pulls what a pull frame names onto `device`, within a deadline."""

    def __init__(self, device: jax.Device, host: str = "127.0.0.1"):
        self.device = device
        self.server = _TransferServer(host)
        self._connections: dict[str, object] = {}
        self._lock = threading.Lock()

    def _connection(self, address: str):
        with self._lock:
            if address not in self._connections:
                self._connections[address] = self.server.get().connect(address)
            return self._connections[address]

    def _pull_now(self, pull: worker_pb2.KVPull, shape, dtype, timeout_s: float) -> jax.Array:
        spec = jax.ShapeDtypeStruct(tuple(shape), dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(self.device))
        expires = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        (array,) = self._connection(pull.address).pull(pull.uuid, [spec], timeout=expires)
        return jax.block_until_ready(array)

    async def pull(self, header: worker_pb2.KVHeader, timeout_s: float) -> wire.KVPiece:
        """The piece a checked pull frame names. WireError("truncated") when the pull fails
        or does not finish within `timeout_s` (the sender died, froze or withdrew it)."""
        dtype = wire.WIRE_DTYPES[header.dtype]
        loop = asyncio.get_running_loop()
        job = loop.create_future()

        def hand_over(settle) -> None:
            try:
                loop.call_soon_threadsafe(lambda: job.done() or settle())
            except RuntimeError:  # the worker's loop closed while an abandoned pull ran
                pass

        def run():  # a daemon thread, not a pool's: an abandoned pull must not block exit
            try:
                result = self._pull_now(header.pull, header.shape, dtype, timeout_s)
            except Exception as e:  # noqa: BLE001 - handed to the waiting coroutine
                hand_over(lambda e=e: job.set_exception(e))
            else:
                hand_over(lambda: job.set_result(result))

        threading.Thread(target=run, name="kv-pull", daemon=True).start()
        try:
            pulled = await asyncio.wait_for(job, timeout_s)
        except TimeoutError:
            raise wire.WireError("truncated", f"request {header.request_id!r}: pulling its KV "
                                 f"from the prefill worker took over {timeout_s:g} s") from None
        except Exception as e:  # noqa: BLE001 - the transfer server's errors are RuntimeErrors
            raise wire.WireError("truncated", f"request {header.request_id!r}: pulling its KV "
                                 f"from the prefill worker failed: {e}") from None
        n, first = header.token_end - header.token_start, header.pull.offset
        return wire.KVPiece(header, pulled[:, :, :, first:first + n])  # stays on the device
