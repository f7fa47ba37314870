"""FP8 weights: the decoder layers' linear weights stored in float8_e4m3fn, one byte each, with
a float32 scale per output row, and widened to the compute dtype inside the matmul.

Decode streams every weight once per step, so its time is the weights' bytes over memory
bandwidth: one byte a weight instead of bf16's two roughly halves a memory-bound step and frees
HBM for KV. Weight-only: activations, the KV pool and the matmul stay in `model.dtype` (the
GPU's FP8 peak is not used), which keeps the quality loss to rounding each weight to 3 mantissa
bits relative to its row's largest (the per-row scale maps that to e4m3's 448). Embeddings,
norms, biases and the LM head keep `model.dtype`.

`quantize_params` turns a loaded parameter tree into that form: each `{"weight": w}` of the
projections below becomes `{"weight": fp8, "weight_scale": f32[out]}` (stacked layers keep their
leading layer axis); `Linear` (model/llama.py) sees the scale and multiplies its output by it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = "float8_e4m3fn"
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@jax.jit
def quantize_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(fp8 weight, f32 scale per output row) of a `[..., out, in]` weight: w ~ q * scale."""
    peak = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=-1)
    scale = jnp.where(peak > 0, peak / FP8_MAX, 1.0)
    q = (w.astype(jnp.float32) / scale[..., None]).astype(jnp.float8_e4m3fn)
    return q, scale


def quantize_params(params, weight_dtype: str | None):
    """`params` with every projection's weight in `weight_dtype` (None: unchanged). A tree
    already quantized is returned as it is."""
    if weight_dtype is None:
        return params
    if weight_dtype != FP8:
        raise ValueError(f"weight_dtype {weight_dtype!r}: only {FP8} is supported")

    def walk(node, name: str = ""):
        if not isinstance(node, dict):
            return node
        if name in PROJECTIONS and "weight" in node and "weight_scale" not in node:
            q, scale = quantize_weight(node["weight"])
            return {**node, "weight": q, "weight_scale": scale}
        return {k: walk(v, k) for k, v in node.items()}

    return walk(params)


def dequantize_weight(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """The weight a quantized one stands for (tests and tools)."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)
