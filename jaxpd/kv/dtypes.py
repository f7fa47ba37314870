"""What a KV pool stores: the model's dtype, or a narrower one (`kv.dtype`).

An 8-bit KV cache halves the bytes of every page against bfloat16: twice the tokens in the same
memory, and half the bytes each decode step reads and each hand-off moves.

- `float8_e4m3fn` (vLLM's `kv_cache_dtype=fp8`): values stored unscaled (as vLLM does without
  calibrated scales): e4m3 keeps 3 mantissa bits over a range of +-448, which post-RoPE K and V
  of Llama models stay well inside; anything beyond is clipped rather than becoming NaN.
- `int8`: each token's row of each head (head_dim values) is scaled by its own absolute maximum
  to [-127, 127] and stored with that scale: the row is head_dim int8 values followed by the
  float32 scale's 4 bytes (`row_width`). Packing the scale into the row keeps a pool, a gather
  and a wire frame one array each, so every path that moves KV moves scales with it. 7 bits of
  uniform precision per row: measured, it keeps accuracy where fp8 does not (docs/benchmarks.md).

Attention reads the pages and widens them to float32 (`from_storage`) before any arithmetic, so
only storage is narrow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

KV_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
             "float8_e4m3fn": jnp.float8_e4m3fn, "int8": jnp.int8}
SCALED = ("int8",)  # rows carry their scale: head_dim values, then a float32
SCALE_BYTES = 4
KV_DTYPE_ALIASES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "bf16": "bfloat16",
                    "fp16": "float16", "fp32": "float32"}
# How each is laid out on the wire and on the host (numpy has no bfloat16/float8 of its own).
HOST_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
               "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn), "int8": np.dtype(np.int8)}


def canonical_kv_dtype(requested: str) -> str:
    """`kv.dtype` by its full name (`fp8` -> `float8_e4m3fn`); ValueError for an unknown one."""
    name = KV_DTYPE_ALIASES.get(requested, requested)
    if name != "auto" and name not in KV_DTYPES:
        raise ValueError(f"{requested!r} is not one of auto, {', '.join(KV_DTYPES)} (or fp8)")
    return name


def kv_dtype_name(requested: str, model_dtype: str) -> str:
    """The pool's dtype for `kv.dtype` (`auto`: the model's)."""
    name = canonical_kv_dtype(requested)
    return model_dtype if name == "auto" else name


def row_width(dtype: str, head_dim: int) -> int:
    """Elements of one stored row (one token, one head) in a pool of `dtype`."""
    return head_dim + SCALE_BYTES if dtype in SCALED else head_dim


def to_storage(x: jax.Array, dtype) -> jax.Array:
    """`x` ([..., head_dim]) as a pool of `dtype` stores it: cast, clipped to the storage
    type's range when that is an 8-bit float (e4m3fn has no infinity: an overflowing cast would
    give NaN); int8 rows quantized by their own scale, which follows them ([..., head_dim + 4])."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        x = x.astype(jnp.float32)
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        values = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
        scale_bytes = jax.lax.bitcast_convert_type(scale[..., 0], jnp.int8)  # [..., 4]
        return jnp.concatenate([values, scale_bytes], axis=-1)
    if dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating):
        top = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -top, top)
    return x.astype(dtype)


def from_storage(x: jax.Array, head_dim: int) -> jax.Array:
    """Stored rows back as float32 [..., head_dim] (int8 rows times their scale)."""
    if x.dtype == jnp.int8:
        scale = jax.lax.bitcast_convert_type(x[..., head_dim:head_dim + SCALE_BYTES],
                                             jnp.float32)
        return x[..., :head_dim].astype(jnp.float32) * scale[..., None]
    return x.astype(jnp.float32)


def convert_rows(x: jax.Array, from_dtype, to_dtype, head_dim: int) -> jax.Array:
    """Rows stored as `from_dtype` restored as `to_dtype` (unchanged when they are the same:
    a hand-off between pools of one dtype stays bit for bit)."""
    if jnp.dtype(from_dtype) == jnp.dtype(to_dtype):
        return x
    return to_storage(from_storage(x, head_dim), to_dtype)
