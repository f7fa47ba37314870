"""The KV wire format: canonical bytes survive framing and resharding; bad messages are refused."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxpd.engine.prefill import PrefillEngine
from jaxpd.engine.request import Request, Sequence
from jaxpd.kv.layout import canonical_heads
from jaxpd.model.sharding import make_mesh, shard_params
from jaxpd.kv.layout import KVLayout
from jaxpd.transfer import wire
from jaxpd.v1 import worker_pb2
from test_transfer import _side


def _prefilled(runner, prompt):
    seq = Sequence(Request("r1", tuple(prompt)), seed=0)
    engine = PrefillEngine(runner, chunk_size=16)
    assert engine.admit(seq)
    while not engine.step([seq]):
        pass
    return seq


def _frames(ctx, runner, seq, start, end):
    arr, offset = wire.gather_tokens(runner.manager.kv, runner.manager.layout, seq.pages.pages,
                                     start, end)
    return list(wire.encode_tokens(ctx, seq.id, np.asarray(jax.device_get(arr)), offset, start, end))


@pytest.mark.parametrize("src_tp, dst_tp, max_bytes", [(4, 1, 1 << 20), (2, 4, 1 << 20), (1, 2, 700)])
def test_wire_round_trip_is_byte_exact_across_tp(devices, llama, src_tp, dst_tp, max_bytes):
    src = _side(llama, devices[:src_tp], src_tp)
    dst = _side(llama, devices[8 - dst_tp:], dst_tp)
    prompt = list(range(3, 22))
    seq = _prefilled(src, prompt)
    fp = wire.model_fingerprint(llama.config, llama.params)
    src_ctx = wire.WireContext(fp, src.manager.layout, max_bytes)
    dst_ctx = wire.WireContext(fp, dst.manager.layout, max_bytes)
    # Two ranges, as a chunked prefill would send them; small max_bytes splits tokens too.
    frames = _frames(src_ctx, src, seq, 0, 7) + _frames(src_ctx, src, seq, 7, len(prompt))
    if max_bytes < 1000:
        assert len(frames) > 2 * llama.config.num_layers
    dst_pages = dst.manager.allocate(len(prompt)).pages
    for raw in frames:
        assert worker_pb2.KVChunk.FromString(raw).header.request_id == "r1"  # stock protobuf parses it
        piece = wire.check_piece(dst_ctx, *wire.parse_frame(raw))
        dst.manager.kv = wire.write_piece(dst.manager.kv, dst.manager.layout, dst_pages, piece)
    digest_src = wire.prompt_kv_digest(src.manager.kv, src.manager.layout, seq.pages.pages, len(prompt))
    digest_dst = wire.prompt_kv_digest(dst.manager.kv, dst.manager.layout, dst_pages, len(prompt))
    assert digest_src == digest_dst
    for layer in range(llama.config.num_layers):
        a = np.asarray(canonical_heads(src.manager.kv.k[layer], src.manager.layout, 0))
        b = np.asarray(canonical_heads(dst.manager.kv.k[layer], dst.manager.layout, 0))
        a = a[:, seq.pages.pages].reshape(a.shape[0], -1, a.shape[-1])[:, :len(prompt)]
        b = b[:, dst_pages].reshape(b.shape[0], -1, b.shape[-1])[:, :len(prompt)]
        assert a.tobytes() == b.tobytes()


def test_split_ranges_cover_everything_within_the_limit():
    for layers, tokens, per, cap in [(4, 19, 64, 10_000), (32, 1, 1 << 16, 1 << 20), (3, 100, 8, 50)]:
        pieces = wire.split_ranges(layers, tokens, per, cap)
        covered = {(l, t) for l0, l1, t0, t1 in pieces for l in range(l0, l1) for t in range(t0, t1)}
        assert covered == {(l, t) for l in range(layers) for t in range(tokens)}
        assert all((l1 - l0) * (t1 - t0) * per <= max(cap, per) for l0, l1, t0, t1 in pieces)


def _one_frame(llama, devices):
    src = _side(llama, devices[:1], 1)
    seq = _prefilled(src, range(3, 10))
    ctx = wire.WireContext(wire.model_fingerprint(llama.config, llama.params), src.manager.layout)
    return ctx, _frames(ctx, src, seq, 0, 7)[0]


def test_bad_messages_are_refused_with_their_kind(devices, llama):
    ctx, raw = _one_frame(llama, devices)
    header, payload = wire.parse_frame(raw)
    other = dataclasses.replace(ctx, fingerprint=b"x" * 16)
    with pytest.raises(wire.WireError, match="another model") as e:
        wire.check_piece(other, header, payload)
    assert e.value.kind == "precondition"
    corrupt = bytearray(payload)
    corrupt[5] ^= 0xFF
    with pytest.raises(wire.WireError, match="CRC-32C") as e:
        wire.check_piece(ctx, header, memoryview(bytes(corrupt)))
    assert e.value.kind == "data_loss"
    unknown = worker_pb2.KVHeader()
    unknown.CopyFrom(header)
    unknown.dtype = "float64"
    with pytest.raises(wire.WireError, match="dtype") as e:
        wire.check_piece(ctx, unknown, payload)
    assert e.value.kind == "precondition"
    bf16 = worker_pb2.KVHeader()  # a dtype the receiver can cast, but not these bytes
    bf16.CopyFrom(header)
    bf16.dtype = "bfloat16"
    with pytest.raises(wire.WireError, match="payload has") as e:
        wire.check_piece(ctx, bf16, payload)
    assert e.value.kind == "invalid"
    short = worker_pb2.KVHeader()
    short.CopyFrom(header)
    short.token_end -= 1
    short.shape[3] -= 1
    short.crc32c = wire.crc32c(payload)
    with pytest.raises(wire.WireError, match="payload has"):
        wire.check_piece(ctx, short, payload)
    with pytest.raises(wire.WireError, match="not a KVChunk"):
        wire.parse_frame(b"\x0a\x7f\x00")


def test_fingerprint_tracks_weights_not_mesh(devices, llama):
    fp = wire.model_fingerprint(llama.config, llama.params)
    mesh = make_mesh(devices[:2], 2)
    assert wire.model_fingerprint(llama.config, shard_params(llama.params, llama.config, mesh)) == fp
    nudged = jax.tree_util.tree_map(lambda x: x, llama.params)
    nudged["embed_tokens"] = {"weight": nudged["embed_tokens"]["weight"].at[0, 0].add(1.0)}
    assert wire.model_fingerprint(llama.config, nudged) != fp


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_every_kv_dtype_frames_and_parses_bit_exact(dtype):
    layout = KVLayout(num_layers=3, model_kv_heads=2, head_repeat=1, head_dim=8, page_size=4,
                      dtype=dtype, tp=1)
    ctx = wire.WireContext(b"f" * 16, layout, max_message_bytes=200)
    kv = np.random.default_rng(0).standard_normal((3, 2, 2, 9, 8)).astype(wire.WIRE_DTYPES[dtype])
    frames = list(wire.encode_tokens(ctx, "r", kv, 0, 0, 9))
    assert len(frames) > 3
    out = np.zeros_like(kv)
    for raw in frames:
        piece = wire.check_piece(ctx, *wire.parse_frame(raw))
        h = piece.header
        out[h.layer_start:h.layer_end, :, :, h.token_start:h.token_end] = piece.array
    assert out.tobytes() == kv.tobytes()
