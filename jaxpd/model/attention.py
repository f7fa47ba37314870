"""Reference attention (pure jnp) for the model's two phases.

These are the numerical ground truth the Pallas kernels and paged engines are checked against.
Scores and softmax run in f32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def _softmax_attend(scores: jax.Array, mask: jax.Array, v: jax.Array, out_dtype) -> jax.Array:
    scores = jnp.where(mask, scores, -jnp.inf)
    # A fully masked row (padding query) would be NaN; give it uniform weights instead.
    scores = jnp.where(mask.any(axis=-1, keepdims=True), scores, 0.0)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    b, t, k, g, d = out.shape
    return out.reshape(b, t, k * g, d).astype(out_dtype)


def causal_attention(q: jax.Array,  # [batch, seq, heads, head_dim]
                     k: jax.Array,  # [batch, seq, kv_heads, head_dim]
                     v: jax.Array,  # [batch, seq, kv_heads, head_dim]
                     q_positions: jax.Array,  # i32[batch, seq]
                     kv_positions: jax.Array,  # i32[batch, seq_kv]; -1 marks padding
                     *,
                     sliding_window: int | None = None) -> jax.Array:
    """Attention of each query over keys at positions <= its own (and within the window)."""
    scale = q.shape[-1] ** -0.5
    qg = _grouped(q, k.shape[2])
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    qp = q_positions[:, None, None, :, None]
    kp = kv_positions[:, None, None, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        mask &= kp > qp - sliding_window
    return _softmax_attend(scores, mask, v, q.dtype)
