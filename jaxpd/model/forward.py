"""Pure, jit-able entry points of the model: full-sequence prefill and one-token decode.

Both work on contiguous per-sequence KV (the paged engines build on the same `LlamaModel` with
their own `attend`). Batches are right-padded: `lengths[b]` tokens of row b are real.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpd.kv.dtypes import KV_DTYPES, from_storage, to_storage
from jaxpd.model.attention import causal_attention
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import LlamaModel, kv_head_repeat, no_attention
from jaxpd.model.sharding import tp_size

Params = dict


class StackedKV(NamedTuple):
    """Every layer's K and V, stacked on a leading layer axis (what a scanned layer stack
    carries and indexes with its traced layer index)."""

    k: jax.Array  # [layers, batch, seq, kv_heads_in_cache, head_dim]
    v: jax.Array  # [layers, batch, seq, kv_heads_in_cache, head_dim]


# How a contiguous cache is laid out on a mesh: stored KV heads on tp.
CACHE_SPEC = P(None, None, None, "tp", None)


class PrefillOutput(NamedTuple):
    logits: jax.Array  # f32[batch, vocab] at each row's last real token (or [batch, seq, vocab])
    kv: StackedKV  # padding positions hold garbage


def build_model(config: ModelConfig, mesh: Mesh | None = None) -> LlamaModel:
    return LlamaModel(mesh=mesh, config=config)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (host/default device; see `sharding.shard_params` to place them)."""
    model = build_model(config)

    def init_all(module: LlamaModel, tokens, positions):
        hidden, _ = module(tokens, positions, no_attention, None)
        return module.logits(hidden)

    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tokens, tokens, method=init_all)["params"]


def _empty_cache(config: ModelConfig, mesh: Mesh | None, batch: int, seq: int) -> StackedKV:
    """Zeroed K/V for every layer (stored heads: TP-replicated when TP exceeds the KV heads)."""
    heads = config.num_kv_heads * kv_head_repeat(config, tp_size(mesh))
    zeros = jnp.zeros((config.num_layers, batch, seq, heads, config.head_dim), config.jnp_dtype)
    if mesh is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, NamedSharding(mesh, CACHE_SPEC))
    return StackedKV(zeros, zeros)


def _prefill_attend(config: ModelConfig, q_positions: jax.Array, kv_positions: jax.Array,
                    kv_dtype: str | None = None):
    """Causal attention within each prompt; each layer's K/V is written into its cache slot.
    `kv_dtype`: attend over K/V as a pool of that dtype would hold them (stored, then read
    back), which is how the accuracy of a narrower KV cache is measured."""

    def attend(layer, q, k, v, cache: StackedKV):
        if kv_dtype is not None:
            hd = k.shape[-1]
            k = from_storage(to_storage(k, KV_DTYPES[kv_dtype]), hd).astype(k.dtype)
            v = from_storage(to_storage(v, KV_DTYPES[kv_dtype]), hd).astype(v.dtype)
        out = causal_attention(q, k, v, q_positions, kv_positions,
                               sliding_window=config.sliding_window)
        return out, StackedKV(cache.k.at[layer].set(k), cache.v.at[layer].set(v))

    return attend


@functools.partial(jax.jit, static_argnames=("config", "mesh", "all_logits", "kv_dtype"))
def prefill(params: Params,
            tokens: jax.Array,  # i32[batch, seq]
            lengths: jax.Array,  # i32[batch]
            *, config: ModelConfig, mesh: Mesh | None = None,
            all_logits: bool = False, kv_dtype: str | None = None) -> PrefillOutput:
    """Run whole prompts; return logits and every layer's K/V (rotated, TP-replicated heads).
    `kv_dtype`: attention sees K/V as a KV pool of that dtype stores them."""
    model = build_model(config, mesh)
    seq = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
    kv_positions = jnp.where(positions < lengths[:, None], positions, -1)
    hidden, kv = model.apply({"params": params}, tokens, positions,
                             _prefill_attend(config, positions, kv_positions, kv_dtype),
                             _empty_cache(config, mesh, *tokens.shape))
    if not all_logits:
        hidden = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = model.apply({"params": params}, hidden, method=LlamaModel.logits)
    return PrefillOutput(logits, kv)


@functools.partial(jax.jit, static_argnames=("config", "mesh"), donate_argnames=("cache",))
def decode(params: Params,
           tokens: jax.Array,  # i32[batch]
           cache: StackedKV,  # [layers, batch, max_seq, kv_heads_in_cache, head_dim]
           lengths: jax.Array,  # i32[batch]: tokens already in the cache
           *, config: ModelConfig, mesh: Mesh | None = None):
    """One token per sequence: write its K/V at `lengths[b]`, attend, return f32[batch, vocab]."""
    model = build_model(config, mesh)
    batch = tokens.shape[0]
    max_seq = cache.k.shape[2]
    rows = jnp.arange(batch)
    slots = jnp.arange(max_seq, dtype=jnp.int32)[None, :]
    kv_positions = jnp.where(slots <= lengths[:, None], slots, -1)

    def attend(layer, q, k, v, cache: StackedKV):
        cache = StackedKV(cache.k.at[layer, rows, lengths].set(k[:, 0]),
                          cache.v.at[layer, rows, lengths].set(v[:, 0]))
        out = causal_attention(q, cache.k[layer], cache.v[layer], lengths[:, None], kv_positions,
                               sliding_window=config.sliding_window)
        return out, cache

    hidden, new_cache = model.apply({"params": params}, tokens[:, None], lengths[:, None],
                                    attend, cache)
    logits = model.apply({"params": params}, hidden[:, 0], method=LlamaModel.logits)
    return logits, new_cache
