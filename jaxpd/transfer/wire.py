"""The KV wire format: a request's KV in the canonical layout, cut into typed, checksummed messages.

Canonical means what both ends agree on whatever their meshes: the model's KV heads (TP head
replication stripped), tokens in order, little-endian elements. One message's payload is the
array `[layers, 2 (K, V), heads, tokens, head_dim]` for a layer range and a token range, and its
`KVHeader` says which ranges, the dtype and shape, the model fingerprint and a CRC-32C. So a
TP=4 prefill mesh can feed a TP=1 decode mesh, and the bytes do not depend on the device kind.

A message is framed by hand as the protobuf encoding of `KVChunk{header, data}`: the payload is
copied once into the frame (protobuf would copy it three times) and read back as a zero-copy
view. Any protobuf library still parses the frame as a `KVChunk`. Nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Iterator

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np

from jaxpd.engine.buckets import pow2_bucket
from jaxpd.kv.allocator import NULL_BLOCK
from jaxpd.kv.dtypes import HOST_DTYPES, convert_rows, row_width
from jaxpd.kv.layout import KVLayout, canonical_heads, replicate_heads
from jaxpd.kv.pool import KVPages
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import is_stacked, layer_name
from jaxpd.v1 import worker_pb2

WIRE_DTYPES = HOST_DTYPES  # the sender's pool dtype; the receiver casts to its own


class WireError(Exception):
    """A KV message that must not be written. `kind` picks the gRPC status the receiver returns."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "precondition" (other model or layout) | "data_loss" | "invalid"


def crc32c(buf) -> int:
    """CRC-32C of any buffer (google_crc32c takes numpy arrays but not memoryviews)."""
    return google_crc32c.value(np.frombuffer(buf, np.uint8))


# -- the model fingerprint ---------------------------------------------------------------------
def model_fingerprint(config: ModelConfig, params) -> bytes:
    """16 bytes naming the model: its shape and a sample of every weight tensor.

    Workers compare it before accepting KV, so a decode worker never mixes KV from another
    checkpoint (or revision) into its pool. It does not depend on the mesh or TP degree.
    """
    shape = {k: v for k, v in config.to_dict().items()
             if k not in ("dtype", "eos_token_ids", "scan_layers")}
    h = hashlib.blake2b(repr(sorted(shape.items())).encode(), digest_size=16)
    samples = {}  # "layers_<i>/…" names in both layer forms, so the two agree
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(k.key for k in path)
        if is_stacked(keys):  # every layer's sample, under its unrolled name
            host = _on_host(leaf[:, :2])
            for i in range(host.shape[0]):
                samples["/".join((layer_name(i),) + keys[1:])] = host[i]
        else:
            samples["/".join(keys)] = _on_host(leaf[:2] if leaf.ndim else leaf)
    for name in sorted(samples):
        h.update(name.encode())
        h.update(samples[name].tobytes())
    return h.digest()


def _on_host(x: jax.Array) -> np.ndarray:
    """`x` as float32 on the host, also when it spans several processes (a multi-host replica:
    then every process must call this, as they all compute the fingerprint)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x), np.float32)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float32)


# -- prefill side: gather, split, frame ---------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("layout",))
def gather_pages(kv: KVPages, pages: jax.Array, *, layout: KVLayout) -> jax.Array:
    """[layers, 2, model_kv_heads, len(pages) * page_size, head_dim]: `pages` of every layer."""
    def one(x):  # [layers, kv_heads, n, page_size, head_dim] -> canonical heads, tokens flat
        x = canonical_heads(x[:, :, pages], layout, 1)
        return x.reshape(*x.shape[:2], -1, x.shape[-1])
    return jnp.stack([one(kv.k), one(kv.v)], axis=1)


def gather_index(layout: KVLayout, seq_pages: list[int], start: int,
                 end: int) -> tuple[np.ndarray, int]:
    """(the pages holding tokens [start, end), padded with the null page to a power of two to
    bound compilations; the offset of `start` in their token axis)."""
    ps = layout.page_size
    first, last = start // ps, -(-end // ps)
    idx = np.full(pow2_bucket(last - first), NULL_BLOCK, np.int32)
    idx[:last - first] = seq_pages[first:last]
    return idx, start - first * ps


def gather_tokens(kv: KVPages, layout: KVLayout, seq_pages: list[int], start: int,
                  end: int) -> tuple[jax.Array, int]:
    """Dispatch the gather of tokens [start, end) (asynchronously); returns (device array, the
    offset of `start` in its token axis)."""
    idx, offset = gather_index(layout, seq_pages, start, end)
    return gather_pages(kv, jnp.asarray(idx), layout=layout), offset


def split_ranges(num_layers: int, num_tokens: int, bytes_per_layer_token: int,
                 max_bytes: int) -> list[tuple[int, int, int, int]]:
    """(layer_start, layer_end, token_start, token_end) pieces, each at most `max_bytes`
    (unless one layer-token is bigger): whole layers while they fit, else token slices."""
    per_layer = bytes_per_layer_token * num_tokens
    if per_layer <= max_bytes:
        step = max(1, max_bytes // per_layer)
        return [(l0, min(l0 + step, num_layers), 0, num_tokens) for l0 in range(0, num_layers, step)]
    tokens = max(1, max_bytes // bytes_per_layer_token)
    return [(l, l + 1, t0, min(t0 + tokens, num_tokens))
            for l in range(num_layers) for t0 in range(0, num_tokens, tokens)]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame_prefix(header: worker_pb2.KVHeader, payload_bytes: int) -> bytes:
    """Everything of a KVChunk frame before its payload (the payload follows it directly)."""
    h = header.SerializeToString()
    tail = b"\x12" + _varint(payload_bytes) if payload_bytes else b""
    return b"\x0a" + _varint(len(h)) + h + tail


def frame(header: worker_pb2.KVHeader, payload: bytes | memoryview = b"") -> bytes:
    """The protobuf encoding of KVChunk{header, data}, with the payload copied once."""
    return b"".join([frame_prefix(header, len(payload)), payload])


@dataclasses.dataclass(frozen=True)
class WireContext:
    """What a sender stamps on, and a receiver requires of, every message."""

    fingerprint: bytes
    layout: KVLayout
    max_message_bytes: int = 4 << 20

    @property
    def wire_dtype(self) -> np.dtype:
        return WIRE_DTYPES[self.layout.dtype]

    def bytes_per_layer_token(self) -> int:
        return 2 * self.layout.model_kv_heads * self.layout.row_width * self.wire_dtype.itemsize


def encode_parts(ctx: WireContext, request_id: str, host: np.ndarray, offset: int,
                 start: int, end: int,
                 token: str = "") -> Iterator[tuple[worker_pb2.KVHeader, np.ndarray]]:
    """(header without its CRC, payload block: a strided view of `host`) of each message for
    tokens [start, end) of `host` (a `gather_tokens` result on the host); `token` is the
    request's EngineRequest.request_token."""
    layout = ctx.layout
    pieces = split_ranges(layout.num_layers, end - start, ctx.bytes_per_layer_token(),
                          ctx.max_message_bytes)
    for l0, l1, t0, t1 in pieces:
        block = host[l0:l1, :, :, offset + t0:offset + t1].astype(ctx.wire_dtype, copy=False)
        yield worker_pb2.KVHeader(
            request_id=request_id, layer_start=l0, layer_end=l1, token_start=start + t0,
            token_end=start + t1, head_start=0, head_end=layout.model_kv_heads,
            dtype=layout.dtype, shape=block.shape, model_fingerprint=ctx.fingerprint,
            request_token=token), block


def encode_frame_parts(ctx: WireContext, request_id: str, host: np.ndarray, offset: int,
                       start: int, end: int,
                       token: str = "") -> Iterator[tuple[bytes, memoryview]]:
    """(frame prefix, payload) of each frame for tokens [start, end) of `host`, the header
    carrying the payload's CRC-32C: a socket writes the two one after the other, so the
    payload is copied once (contiguous, for the CRC) and never joined into one buffer."""
    for header, block in encode_parts(ctx, request_id, host, offset, start, end, token):
        # uint8 view: bfloat16 (ml_dtypes) arrays do not export the buffer protocol
        payload = np.ascontiguousarray(block).view(np.uint8).reshape(-1).data
        header.crc32c = crc32c(payload)
        yield frame_prefix(header, len(payload)), payload


def encode_tokens(ctx: WireContext, request_id: str, host: np.ndarray, offset: int,
                  start: int, end: int, token: str = "") -> Iterator[bytes]:
    """Frames for tokens [start, end) of `host`, each with its payload's CRC-32C."""
    for prefix, payload in encode_frame_parts(ctx, request_id, host, offset, start, end, token):
        yield b"".join([prefix, payload])


def finish_frame(ctx: WireContext, request_id: str, num_tokens: int, first_token: int,
                 first_logprob: float, token: str = "") -> bytes:
    header = worker_pb2.KVHeader(
        request_id=request_id, dtype=ctx.layout.dtype, model_fingerprint=ctx.fingerprint,
        crc32c=crc32c(b""), request_token=token,
        finish=worker_pb2.KVFinish(num_tokens=num_tokens, first_token=first_token,
                                   first_logprob=first_logprob))
    return frame(header)


# -- decode side: parse, check, write ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KVPiece:
    """One received message: its header and its payload as an array (a view of the frame)."""

    header: worker_pb2.KVHeader
    # [layers, 2, heads, tokens, row]; None on a finish-only frame; a device array when pulled
    # (serving.transport: jax)
    array: np.ndarray | jax.Array | None


def trim_tokens(piece: KVPiece, first: int) -> KVPiece | None:
    """`piece` without its tokens before `first` (a receiver's prefix-cached blocks, which
    other requests share and no transfer may overwrite); None when nothing is left."""
    h = piece.header
    if piece.array is None or h.token_start >= first:
        return piece
    if h.token_end <= first:
        return None
    header = worker_pb2.KVHeader()
    header.CopyFrom(h)
    header.token_start = first
    header.shape[3] = h.token_end - first
    return KVPiece(header, piece.array[:, :, :, first - h.token_start:])


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def parse_frame(raw: bytes) -> tuple[worker_pb2.KVHeader, memoryview]:
    """(header, payload view) of a KVChunk encoding, without copying the payload."""
    buf, pos = memoryview(raw), 0
    header, payload = worker_pb2.KVHeader(), memoryview(b"")
    try:
        while pos < len(buf):
            tag, pos = _read_varint(buf, pos)
            if tag & 7 != 2:
                raise ValueError(f"unexpected wire type in field {tag >> 3}")
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            if tag >> 3 == 1:
                header.MergeFromString(bytes(buf[pos:pos + n]))
            elif tag >> 3 == 2:
                payload = buf[pos:pos + n]
            pos += n
    except (ValueError, IndexError) as e:
        raise WireError("invalid", f"not a KVChunk message ({e})") from None
    return header, payload


def check_piece(ctx: WireContext, header: worker_pb2.KVHeader, payload: memoryview, *,
                verify_crc: bool = True) -> KVPiece:
    """Refuse a message from another model or layout, or with a bad checksum, before any write.
    `verify_crc=False` for frames that came through this host's shared memory (shm), which
    carry no checksum: their bytes never crossed a wire."""
    layout = ctx.layout
    if header.model_fingerprint != ctx.fingerprint:
        raise WireError("precondition", f"request {header.request_id!r}: KV comes from another "
                        f"model (fingerprint {header.model_fingerprint.hex()[:16]} != this "
                        f"worker's {ctx.fingerprint.hex()[:16]}); both workers must serve the "
                        f"same checkpoint")
    dtype = WIRE_DTYPES.get(header.dtype)
    if dtype is None:
        raise WireError("precondition", f"request {header.request_id!r}: KV dtype {header.dtype!r} "
                        f"is not one of {', '.join(WIRE_DTYPES)}")
    if verify_crc and crc32c(payload) != header.crc32c:
        raise WireError("data_loss", f"request {header.request_id!r}: KV payload for tokens "
                        f"[{header.token_start}, {header.token_end}) fails its CRC-32C check")
    if not len(payload) and not header.shape:
        return KVPiece(header, None)
    want = (header.layer_end - header.layer_start, 2, header.head_end - header.head_start,
            header.token_end - header.token_start, row_width(header.dtype, layout.head_dim))
    if tuple(header.shape) != want or not 0 <= header.layer_start < header.layer_end <= layout.num_layers:
        raise WireError("precondition", f"request {header.request_id!r}: KV shape {list(header.shape)} "
                        f"for layers [{header.layer_start}, {header.layer_end}) does not fit this "
                        f"worker's layout ({layout.num_layers} layers, head_dim {layout.head_dim})")
    if (header.head_start, header.head_end) != (0, layout.model_kv_heads):
        raise WireError("precondition", f"request {header.request_id!r}: KV heads "
                        f"[{header.head_start}, {header.head_end}) must be all "
                        f"{layout.model_kv_heads} of the model's KV heads")
    if len(payload) != int(np.prod(want)) * dtype.itemsize:
        raise WireError("invalid", f"request {header.request_id!r}: payload has {len(payload)} bytes, "
                        f"shape {list(want)} needs {int(np.prod(want)) * dtype.itemsize}")
    return KVPiece(header, np.frombuffer(payload, dtype).reshape(want))


def check_pull(ctx: WireContext, header: worker_pb2.KVHeader) -> None:
    """Refuse a pull frame (serving.transport: jax) before anything is pulled: another model,
    an unknown dtype, or a shape that is not every layer and KV head of a gathered token range
    (bounded, so a forged frame cannot make the receiver allocate without limit)."""
    layout = ctx.layout
    if header.model_fingerprint != ctx.fingerprint:
        raise WireError("precondition", f"request {header.request_id!r}: KV comes from another "
                        f"model; both workers must serve the same checkpoint")
    if header.dtype not in WIRE_DTYPES:
        raise WireError("precondition", f"request {header.request_id!r}: KV dtype "
                        f"{header.dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    n = header.token_end - header.token_start
    shape = tuple(header.shape)
    whole = (layout.num_layers, 2, layout.model_kv_heads)
    if (n <= 0 or len(shape) != 5 or shape[:3] != whole
            or shape[4] != row_width(header.dtype, layout.head_dim)
            or not header.pull.offset + n <= shape[3] <= 2 * (n + 2 * layout.page_size)):
        raise WireError("precondition", f"request {header.request_id!r}: a pull of shape "
                        f"{list(shape)} for tokens [{header.token_start}, {header.token_end}) "
                        f"does not fit this worker's layout ({layout.num_layers} layers, "
                        f"{layout.model_kv_heads} KV heads, head_dim {layout.head_dim})")


@functools.partial(jax.jit, static_argnames=("layout", "layer_start"), donate_argnames=("kv",))
def scatter_tokens(kv: KVPages, update: jax.Array, pages: jax.Array, slots: jax.Array, *,
                   layout: KVLayout, layer_start: int) -> KVPages:
    """`update` [layers, 2, model heads, tokens, row] written at (pages, slots), converted
    from the sender's storage dtype (its own dtype) to this pool's."""
    layers = slice(layer_start, layer_start + update.shape[0])
    hd = layout.head_dim
    k = convert_rows(replicate_heads(update[:, 0], layout, 1), update.dtype, kv.k.dtype, hd)
    v = convert_rows(replicate_heads(update[:, 1], layout, 1), update.dtype, kv.v.dtype, hd)
    return KVPages(kv.k.at[layers, :, pages, slots].set(k), kv.v.at[layers, :, pages, slots].set(v))


def piece_arrays(layout: KVLayout, seq_pages: list[int],
                 piece: KVPiece) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(update, pages, slots): a checked piece as `scatter_tokens`'s host inputs. Token counts
    are padded to a power of two (padding lands in the null page) so the write compiles once
    per bucket."""
    h, arr = piece.header, piece.array
    n = h.token_end - h.token_start
    bucket = pow2_bucket(n)
    positions = np.arange(h.token_start, h.token_end)
    pages = np.full(bucket, NULL_BLOCK, np.int32)
    slots = np.zeros(bucket, np.int32)
    pages[:n] = np.asarray(seq_pages, np.int32)[positions // layout.page_size]
    slots[:n] = positions % layout.page_size
    if bucket != n and isinstance(arr, jax.Array):  # pulled onto a device: pad it there
        arr = jnp.pad(arr, ((0, 0), (0, 0), (0, 0), (0, bucket - n), (0, 0)))
    elif bucket != n:
        padded = np.zeros(arr.shape[:3] + (bucket,) + arr.shape[4:], arr.dtype)
        padded[:, :, :, :n] = arr
        arr = padded
    return arr, pages, slots


def write_piece(kv: KVPages, layout: KVLayout, seq_pages: list[int], piece: KVPiece) -> KVPages:
    """Write a checked piece into `seq_pages` of the pool (heads re-replicated for `layout`)."""
    update, pages, slots = piece_arrays(layout, seq_pages, piece)
    return scatter_tokens(kv, jnp.asarray(update), jnp.asarray(pages), jnp.asarray(slots),
                          layout=layout, layer_start=piece.header.layer_start)


def digest(gathered: jax.Array, offset: int, num_tokens: int,
           layout: KVLayout) -> tuple[int, int]:
    """(CRC-32C, bytes) of `num_tokens` tokens from `offset` of a gather, in the wire layout."""
    host = np.asarray(jax.device_get(gathered))[:, :, :, offset:offset + num_tokens]
    data = np.ascontiguousarray(host, dtype=WIRE_DTYPES[layout.dtype]).tobytes()
    return crc32c(data), len(data)


def prompt_kv_digest(kv: KVPages, layout: KVLayout, seq_pages: list[int],
                     num_tokens: int) -> tuple[int, int]:
    """(CRC-32C, bytes) of tokens [0, num_tokens) in the canonical wire layout: equal on both
    sides when the decode pool holds exactly the bytes the prefill side computed."""
    arr, offset = gather_tokens(kv, layout, seq_pages, 0, num_tokens)
    return digest(arr, offset, num_tokens, layout)
