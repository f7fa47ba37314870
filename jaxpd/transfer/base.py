"""The two KV hand-off seams, so schedulers never care how KV moves.

- `KVTransport` (in one process): copy pages from one mesh's pool into another's, resharding on
  the way. `DeviceTransport` (device_put) implements it; the in-process disaggregated engine
  (`jaxpd generate --config ...disaggregated...`) uses it.
- Across processes a request's KV is a stream of messages in the canonical wire format
  (`wire.py`: the model's KV heads, no TP replication, little-endian, CRC-32C and model
  fingerprint per message), pushed while prefill runs and written into the receiver's pool in
  its own TP layout. A sender has `open(target, request_id)` returning a stream with
  `send_tokens`, `finish` and `cancel` (asynchronous); `grpc_stream.GrpcKVSender` implements it
  over `KVTransfer.PushKV`, and the decode worker's PushKV handler is the receiving half.
  Another transport (JAX's transfer server, RDMA) would implement the same three calls.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol

import jax
import numpy as np

from jaxpd.kv.manager import KVCacheManager


class KVTransport(Protocol):
    def transfer(self, src: KVCacheManager, src_pages: list[int],
                 dst: KVCacheManager, dst_pages: list[int]) -> None:
        """Copy pages `src_pages` of `src`'s pool into pages `dst_pages` of `dst`'s pool.

        The two pools may live on different meshes with different TP degrees; KV heads are
        resharded (and TP head replication converted) on the way. Returns once the copy is
        enqueued on the destination; later reads of `dst.kv` see it.
        """
        ...


class KVStream(Protocol):
    """One request's KV on its way to another process."""

    async def send_tokens(self, array: jax.Array, offset: int, start: int, end: int) -> None:
        """Send tokens [start, end) of a `wire.gather_tokens` result (at `offset` in it)."""

    async def finish(self, num_tokens: int, first_token: int, first_logprob: float):
        """Send the end of the request's KV; returns once the receiver holds all of it."""

    def cancel(self) -> None:
        """Abandon the stream; the receiver frees what it reserved."""


class KVSender(Protocol):
    def open(self, target: str, request_id: str) -> KVStream:
        """A stream for `request_id`'s KV to the worker at `target` (host:port)."""


async def frames_built_ahead(ctx, request_id: str, array: jax.Array, offset: int, start: int,
                             end: int, token: str = "", *, parts: bool = False) -> AsyncIterator:
    """The wire frames of tokens [start, end) of a gathered array (still on device), each built
    off the event loop while the previous one is written: the device-to-host copy, the CRC and
    the one payload copy overlap the sending, and only two frames are alive at a time (freed
    memory is reused instead of faulting in fresh pages for every frame). `parts`: each frame
    as (prefix, payload), for a socket that writes them without joining them."""
    from jaxpd.transfer import wire

    loop = asyncio.get_running_loop()
    host = await loop.run_in_executor(None, lambda: np.asarray(jax.device_get(array)))
    encode = wire.encode_frame_parts if parts else wire.encode_tokens
    frames = encode(ctx, request_id, host, offset, start, end, token)
    pending = loop.run_in_executor(None, next, frames, None)
    while (f := await pending) is not None:
        pending = loop.run_in_executor(None, next, frames, None)
        yield f
        del f
