"""Pure, jit-able entry points of the model: full-sequence prefill and one-token decode.

Both work on contiguous per-sequence KV (the paged engines build on the same `LlamaModel` with
their own `attend`). Batches are right-padded: `lengths[b]` tokens of row b are real.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxpd.model.attention import causal_attention
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import LlamaModel

Params = dict


class LayerKV(NamedTuple):
    k: jax.Array  # [batch, seq, kv_heads_in_cache, head_dim]
    v: jax.Array  # [batch, seq, kv_heads_in_cache, head_dim]


class PrefillOutput(NamedTuple):
    logits: jax.Array  # f32[batch, vocab] at each row's last real token (or [batch, seq, vocab])
    kv: tuple[LayerKV, ...]  # one per layer; padding positions hold garbage


def build_model(config: ModelConfig, mesh: Mesh | None = None) -> LlamaModel:
    return LlamaModel(mesh=mesh, config=config)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (host/default device; see `sharding.shard_params` to place them)."""
    model = build_model(config)

    def init_all(module: LlamaModel, tokens, positions):
        hidden, _ = module(tokens, positions, _prefill_attend(config, positions, positions), ())
        return module.logits(hidden)

    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tokens, tokens, method=init_all)["params"]


def _prefill_attend(config: ModelConfig, q_positions: jax.Array, kv_positions: jax.Array):
    """Causal attention within each prompt; every layer's K/V is appended to the cache tuple."""

    def attend(layer, q, k, v, cache):
        del layer
        out = causal_attention(q, k, v, q_positions, kv_positions,
                               sliding_window=config.sliding_window)
        return out, cache + (LayerKV(k, v),)

    return attend


@functools.partial(jax.jit, static_argnames=("config", "mesh", "all_logits"))
def prefill(params: Params,
            tokens: jax.Array,  # i32[batch, seq]
            lengths: jax.Array,  # i32[batch]
            *, config: ModelConfig, mesh: Mesh | None = None,
            all_logits: bool = False) -> PrefillOutput:
    """Run whole prompts; return logits and every layer's K/V (rotated, TP-replicated heads)."""
    model = build_model(config, mesh)
    seq = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
    kv_positions = jnp.where(positions < lengths[:, None], positions, -1)
    hidden, kv = model.apply({"params": params}, tokens, positions,
                             _prefill_attend(config, positions, kv_positions), ())
    if not all_logits:
        hidden = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = model.apply({"params": params}, hidden, method=LlamaModel.logits)
    return PrefillOutput(logits, kv)


@functools.partial(jax.jit, static_argnames=("config", "mesh"), donate_argnames=("cache",))
def decode(params: Params,
           tokens: jax.Array,  # i32[batch]
           cache: tuple[LayerKV, ...],  # per layer [batch, max_seq, kv_heads_in_cache, head_dim]
           lengths: jax.Array,  # i32[batch]: tokens already in the cache
           *, config: ModelConfig, mesh: Mesh | None = None):
    """One token per sequence: write its K/V at `lengths[b]`, attend, return f32[batch, vocab]."""
    model = build_model(config, mesh)
    batch = tokens.shape[0]
    max_seq = cache[0].k.shape[1]
    rows = jnp.arange(batch)
    slots = jnp.arange(max_seq, dtype=jnp.int32)[None, :]
    kv_positions = jnp.where(slots <= lengths[:, None], slots, -1)

    def attend(layer, q, k, v, new_cache):
        layer_kv = cache[layer]
        k_all = layer_kv.k.at[rows, lengths].set(k[:, 0])
        v_all = layer_kv.v.at[rows, lengths].set(v[:, 0])
        out = causal_attention(q, k_all, v_all, lengths[:, None], kv_positions,
                               sliding_window=config.sliding_window)
        return out, new_cache + (LayerKV(k_all, v_all),)

    hidden, new_cache = model.apply({"params": params}, tokens[:, None], lengths[:, None],
                                    attend, ())
    logits = model.apply({"params": params}, hidden[:, 0], method=LlamaModel.logits)
    return logits, new_cache
