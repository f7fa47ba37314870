"""What a KV pool stores: the model's dtype, or a narrower one (`kv.dtype`).

An 8-bit float KV cache (`float8_e4m3fn`, vLLM's `kv_cache_dtype=fp8`) halves the bytes of every
page against bfloat16: twice the tokens in the same memory, and half the bytes each decode step
reads and each hand-off moves. Values are stored unscaled (as vLLM does without calibrated
scales): e4m3 keeps 3 mantissa bits over a range of +-448, which post-RoPE K and V of Llama
models stay well inside; anything beyond is clipped rather than becoming NaN. Attention reads
the pages and widens them to float32 before any arithmetic, so only storage is narrow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

KV_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
             "float8_e4m3fn": jnp.float8_e4m3fn}
KV_DTYPE_ALIASES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "bf16": "bfloat16",
                    "fp16": "float16", "fp32": "float32"}
# How each is laid out on the wire and on the host (numpy has no bfloat16/float8 of its own).
HOST_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
               "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn)}


def kv_dtype_name(requested: str, model_dtype: str) -> str:
    """The pool's dtype for `kv.dtype` (`auto`: the model's)."""
    name = KV_DTYPE_ALIASES.get(requested, requested)
    if name == "auto":
        return model_dtype
    if name not in KV_DTYPES:
        raise ValueError(f"KV dtype {requested!r} is not one of auto, {', '.join(KV_DTYPES)}")
    return name


def to_storage(x: jax.Array, dtype) -> jax.Array:
    """`x` as the pool stores it: cast, clipped to the storage type's range when that is an
    8-bit float (e4m3fn has no infinity: an overflowing cast would give NaN)."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating):
        top = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -top, top)
    return x.astype(dtype)
