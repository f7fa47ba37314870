"""KV over gRPC: one client stream (`KVTransfer.PushKV`) per request, prefill -> decode.

The sending half of the cross-process transport (the receiving half is the decode worker's
PushKV handler, which parses and checks frames with `wire.parse_frame` / `wire.check_piece`).
Frames are built off the event loop (the device-to-host copy, the CRC and the one payload copy
are the expensive parts) and written in order; the call carries a deadline so a decode worker
that stops reading cannot strand the request's pages on the prefill side.
"""

from __future__ import annotations

import asyncio


import grpc
import jax

from jaxpd.serving.grpc_server import internal_metadata, new_channel
from jaxpd.transfer import wire
from jaxpd.transfer.base import frames_built_ahead
from jaxpd.v1 import worker_pb2

PUSH_KV = "/jaxpd.v1.KVTransfer/PushKV"


class GrpcKVSender:  # implements transfer.base.KVSender
    """Opens KV streams to decode workers, one channel per worker, reused across requests."""

    def __init__(self, ctx: wire.WireContext, timeout_s: float):
        self.ctx, self.timeout_s = ctx, timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def open(self, target: str, request_id: str, token: str = "") -> GrpcKVStream:
        """`token`: the request's EngineRequest.request_token, stamped on every frame."""
        if target not in self._channels:
            self._channels[target] = new_channel(target)
        call = self._channels[target].stream_unary(
            PUSH_KV, request_serializer=None,
            response_deserializer=worker_pb2.KVAck.FromString)(
                timeout=self.timeout_s, metadata=internal_metadata())
        return GrpcKVStream(self.ctx, call, request_id, token)


class GrpcKVStream:
    """One request's KV stream. Errors surface as `grpc.aio.AioRpcError` with the receiver's
    status (FAILED_PRECONDITION for another model, DATA_LOSS for a bad checksum...)."""

    def __init__(self, ctx: wire.WireContext, call, request_id: str, token: str = ""):
        self.ctx, self._call, self.request_id, self.token = ctx, call, request_id, token
        self.bytes = self.messages = 0

    async def send_tokens(self, array: jax.Array, offset: int, start: int, end: int) -> None:
        """Tokens [start, end) of a `wire.gather_tokens` result (still on device)."""
        async for f in frames_built_ahead(self.ctx, self.request_id, array, offset, start, end,
                                          self.token):
            await self._write(f)
            self.bytes += len(f)
            self.messages += 1

    async def _write(self, frame: bytes) -> None:
        """Write one frame. A write after the receiver refused the push fails with a generic
        error (or finds the call done): the call's own status says why, so that is raised."""
        try:
            await self._call.write(frame)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call  # raises AioRpcError with the receiver's status
            raise

    async def finish(self, num_tokens: int, first_token: int, first_logprob: float) -> worker_pb2.KVAck:
        """Send the finish message; returns once the receiver holds all of the KV."""
        await self._write(wire.finish_frame(self.ctx, self.request_id, num_tokens,
                                            first_token, first_logprob, self.token))
        self.messages += 1
        await self._call.done_writing()
        return await self._call

    def cancel(self) -> None:
        self._call.cancel()
