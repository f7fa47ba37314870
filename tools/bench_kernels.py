"""Attention kernel benchmark: ours beside the anchors, same inputs, outputs checked, one JSON.

    python tools/bench_kernels.py                    # on the device at hand (GPU or TPU)
    python tools/bench_kernels.py --smoke            # tiny shapes on CPU (interpret mode)

Two phases, each a table of (implementation, shape) -> time, throughput, max |diff| against a
float32 reference of the same inputs:
- prefill: causal self-attention over S tokens (32 query heads, 8 KV heads, head dim 128,
  bf16 by default), TFLOP/s counting the causal half (2 * 2 * S^2 / 2 * heads * dim).
  Ours is the paged kernel with the prompt as one chunk over its pages: on GPU the Mosaic GPU
  kernel beside `jax.nn.dot_product_attention` (cudnn, xla), JAX's bundled Mosaic GPU flash
  attention (`ops/gpu/attention_mgpu`, contiguous KV) and tokamax when installed; on TPU the
  TPU kernel beside xla. On CPU the TPU kernel runs interpreted and the GPU kernel's tiling
  runs as its jnp emulation (correctness of the tool, not speed).
- decode: one query token per sequence over a paged cache (page 16), effective GB/s =
  K and V bytes of the contexts / time. Ours (GPU kernel with split-K on GPU; TPU kernel on
  TPU; both on CPU as above), JAX's bundled paged attention on the same page layout (the
  Pallas Triton kernel on GPU, deprecated but the anchor the targets were set against; the TPU
  kernel on TPU), dense attention on contiguous KV (cudnn on GPU, xla elsewhere).
A candidate that cannot run here (no such backend, an import that fails) is listed with the
reason instead of a time. Nothing is asserted: compare the rows (issue 9's targets are in
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from typing import Callable

import numpy as np

import jax
import jax.numpy as jnp


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _time(fn: Callable[[], jax.Array], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile, warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def _run(name: str, fn: Callable[[], jax.Array], reference: np.ndarray, repeats: int,
         work: float, unit: str) -> dict:
    """Time `fn`, check it against `reference`; errors become a row with the reason."""
    try:
        out = np.asarray(jax.block_until_ready(fn()), np.float32)
        diff = float(np.max(np.abs(out - reference)))
        seconds = _time(fn, repeats)
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run here is a row, not a crash
        return {"impl": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"impl": name, "seconds": seconds, unit: work / seconds, "max_abs_diff": diff}


def _pages_for(k: jax.Array, page: int, rng: np.random.Generator):
    """Contiguous [batch, len, kv, dim] K -> permuted pages [kv, pages, page, dim] + table."""
    batch, length, kv, dim = k.shape
    per_seq = -(-length // page)
    pad = per_seq * page - length
    blocks = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch * per_seq, page, kv, dim)
    order = rng.permutation(batch * per_seq)
    pool = jnp.zeros((batch * per_seq + 1, page, kv, dim), k.dtype).at[1 + order].set(blocks)
    table = jnp.asarray(1 + order.reshape(batch, per_seq), jnp.int32)
    return pool.transpose(2, 0, 1, 3), table


def _reference(q, k, v, causal: bool) -> np.ndarray:
    out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                       v.astype(jnp.float32), is_causal=causal,
                                       implementation="xla")
    return np.asarray(out, np.float32)


def _ours(backend: str, interpret) -> dict[str, Callable]:
    """Our kernels that apply here, by row name."""
    from jaxpd.kernels import gpu_paged_attention as gpu
    from jaxpd.kernels.tpu_paged_attention import paged_attention

    tpu = lambda *a, **kw: paged_attention(*a, interpret=interpret, **kw)  # noqa: E731
    if backend == "gpu":
        return {"jaxpd_pallas_gpu": gpu.paged_attention}
    if backend == "tpu":
        return {"jaxpd_pallas_tpu": tpu}
    return {"jaxpd_pallas_tpu": tpu, "jaxpd_gpu_tiling_emulation": gpu.paged_attention_tiled}


def bench_prefill(args, backend: str, interpret) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for s in args.seq:
        key = jax.random.split(jax.random.key(s), 3)
        shape_q, shape_kv = (1, s, args.heads, args.head_dim), (1, s, args.kv_heads, args.head_dim)
        q = jax.random.normal(key[0], shape_q, args.dtype)
        k = jax.random.normal(key[1], shape_kv, args.dtype)
        v = jax.random.normal(key[2], shape_kv, args.dtype)
        ref = _reference(q, k, v, True)
        flops = 2 * 2 * s * s / 2 * args.heads * args.head_dim
        cands: dict[str, Callable] = {
            "xla": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="xla"))}
        if backend == "gpu":
            cands["cudnn"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"))
            cands["jax_mosaic_gpu_flash"] = _bundled_mgpu_flash
            cands["tokamax"] = _tokamax_flash
        kp, table = _pages_for(k, args.page, rng)
        vp = _same_layout(v, kp, table, args.page)
        pos = jnp.arange(s, dtype=jnp.int32)[None]
        lens = jnp.asarray([s], jnp.int32)
        for name, ours in _ours(backend, interpret).items():
            rows.append({"phase": "prefill", "seq": s, **_run(
                name, lambda ours=ours: ours(q, kp, vp, table, pos, lens), ref,
                args.repeats, flops / 1e12, "tflops")})
        for name, fn in cands.items():
            rows.append({"phase": "prefill", "seq": s, **_run(
                name, lambda fn=fn: fn(q, k, v), ref, args.repeats, flops / 1e12, "tflops")})
    return rows


def _bundled_mgpu_flash(q, k, v):
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    heads, kv_heads = q.shape[2], k.shape[2]
    config = mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2)
    return mgpu.attention(q, k, v, config, causal=True) if heads == kv_heads else \
        mgpu.attention(q, jnp.repeat(k, heads // kv_heads, 2), jnp.repeat(v, heads // kv_heads, 2),
                       config, causal=True)


def _tokamax_flash(q, k, v):
    import tokamax  # not a dependency: measured when the device image has it

    return tokamax.dot_product_attention(q, k, v, is_causal=True)


def bench_decode(args, backend: str, interpret) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    itemsize = jnp.dtype(args.dtype).itemsize
    for batch in args.batch:
        for ctx in args.context:
            key = jax.random.split(jax.random.key(batch * 100_003 + ctx), 3)
            q = jax.random.normal(key[0], (batch, 1, args.heads, args.head_dim), args.dtype)
            k = jax.random.normal(key[1], (batch, ctx, args.kv_heads, args.head_dim), args.dtype)
            v = jax.random.normal(key[2], (batch, ctx, args.kv_heads, args.head_dim), args.dtype)
            ref = _reference(q, k, v, False)  # one query at the last position sees every key
            gb = 2 * batch * ctx * args.kv_heads * args.head_dim * itemsize / 1e9
            kp, table = _pages_for(k, args.page, rng)
            vp = _same_layout(v, kp, table, args.page)  # V's pages at K's slots: one table
            lens = jnp.full((batch,), ctx, jnp.int32)
            pos = (lens - 1)[:, None]
            shape = {"phase": "decode", "batch": batch, "context": ctx}
            dense = "cudnn" if backend == "gpu" else "xla"
            rows.append({**shape, **_run(f"dense_{dense}_contiguous", jax.jit(
                lambda q=q, k=k, v=v: jax.nn.dot_product_attention(q, k, v, implementation=dense)),
                ref, args.repeats, gb, "gb_per_s")})
            for name, ours in _ours(backend, interpret).items():
                rows.append({**shape, **_run(name, lambda ours=ours: ours(
                    q, kp, vp, table, pos, lens), ref, args.repeats, gb, "gb_per_s")})
            if backend == "gpu":
                rows.append({**shape, **_run("jax_bundled_gpu_paged_triton", lambda: _bundled_gpu_paged(
                    q, kp, vp, lens, table), ref, args.repeats, gb, "gb_per_s")})
            else:
                rows.append({**shape, **_run("jax_bundled_tpu_paged", lambda: _bundled_tpu_paged(
                    q, kp, vp, lens, table, interpret), ref, args.repeats, gb, "gb_per_s")})
    return rows


def _same_layout(v, kp, table, page):
    """V pages at the same pool slots as K's (the table is shared)."""
    batch, length, kv, dim = v.shape
    per_seq = table.shape[1]
    pad = per_seq * page - length
    blocks = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch * per_seq, page, kv, dim)
    pool = jnp.zeros((kp.shape[1], page, kv, dim), v.dtype).at[table.reshape(-1)].set(blocks)
    return pool.transpose(2, 0, 1, 3)


def _bundled_tpu_paged(q, kp, vp, lens, table, interpret):
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    scaled = q[:, 0] * q.shape[-1] ** -0.5  # the bundled kernel leaves the scale to its caller
    with _force_tpu_interpret() if interpret else contextlib.nullcontext():
        out = paged_attention(scaled, kp, vp, lens, table,
                              pages_per_compute_block=min(8, table.shape[1]))
    return out[:, None]


def _bundled_gpu_paged(q, kp, vp, lens, table):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    scaled = q[:, 0] * q.shape[-1] ** -0.5  # the bundled kernel leaves the scale to its caller
    return paged_attention(scaled, kp, vp, table, lens,
                           pages_per_compute_block=min(8, table.shape[1]))[:, None]


def _force_tpu_interpret():
    from jax._src.pallas.mosaic.interpret.interpret_pallas_call import force_tpu_interpret_mode

    return force_tpu_interpret_mode()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["prefill", "decode", "all"], default="all")
    ap.add_argument("--seq", type=_ints, default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--batch", type=_ints, default=[1, 8, 64, 256])
    ap.add_argument("--context", type=_ints, default=[512, 4096, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes that run on CPU (kernels interpreted): checks the tool")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq, args.batch, args.context = [64], [2], [40]
        args.heads, args.kv_heads, args.head_dim, args.repeats = 4, 2, 64, 1
        args.dtype = "float32"
    args.dtype = jnp.dtype(args.dtype)
    backend = jax.default_backend()
    interpret = True if backend == "cpu" else False
    result = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "backend": backend, "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "dtype": str(args.dtype), "heads": args.heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim, "page": args.page,
              "rows": []}
    if args.phase in ("prefill", "all"):
        result["rows"] += bench_prefill(args, backend, interpret)
    if args.phase in ("decode", "all"):
        result["rows"] += bench_decode(args, backend, interpret)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
