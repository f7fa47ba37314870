"""One jitted model step over paged KV: prefill chunks and decode steps are the same function.

A step takes `tokens[b, t]` at `positions[b, t]` (-1 marks padding), writes their K/V into the
pages named by `page_table[b]`, attends over everything the sequence has cached, and samples the
next token at each row's last real position. Prefill is a step with t = a chunk bucket; decode
is a step with t = 1. Shapes come from a few buckets, so compilations stay bounded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxpd.engine.attention import WritesKV
from jaxpd.engine.sampling import SamplingArrays, sample
from jaxpd.kv.allocator import NULL_BLOCK
from jaxpd.kv.dtypes import to_storage
from jaxpd.kv.pool import KVPages
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import LlamaModel


def write_locations(positions: jax.Array,  # i32[batch, t]; -1 = padding
                    page_table: jax.Array,  # i32[batch, pages_per_seq]
                    page_size: int) -> tuple[jax.Array, jax.Array]:
    """(page, slot) of each token; padding goes to the null page."""
    valid = positions >= 0
    page_index = jnp.where(valid, positions // page_size, 0)
    pages = jnp.where(valid, jnp.take_along_axis(page_table, page_index, axis=1), NULL_BLOCK)
    slots = jnp.where(valid, positions % page_size, 0)
    return pages.reshape(-1), slots.reshape(-1)


def hidden_and_pages(params, kv: KVPages, tokens, positions, page_table, *, config, mesh,
                     attention):
    """(model, hidden state at each row's last real token, pages with the new K/V written):
    the part of a step shared by `step`, `step_logits` and the multi-step decode loop.

    The pool is the layer stack's loop-carried state: each layer writes its K/V at its (traced,
    under scan) layer index in place and hands the whole pool and the index to the attention
    backend, which reads (and for `WritesKV`, writes) that layer in place."""
    model = LlamaModel(mesh=mesh, config=config)
    page_size = kv.k.shape[3]
    pages, slots = write_locations(positions, page_table, page_size)
    kv_lens = jnp.max(positions, axis=1) + 1
    batch, t = tokens.shape

    def attend(layer, q, k, v, kv: KVPages):
        if isinstance(attention, WritesKV):  # one kernel writes the new K/V and attends
            out, k_pages, v_pages = attention(q, k, v, kv.k, kv.v, page_table, positions,
                                              kv_lens, sliding_window=config.sliding_window,
                                              mesh=mesh, layer=layer)
            return out, KVPages(k_pages, v_pages)
        # [layer, :, pages, slots] selects [b*t, kv_heads, head_dim] (numpy's rule for advanced
        # indices split by a slice), whether `layer` is an int or traced
        k_new = to_storage(k.reshape(batch * t, *k.shape[2:]), kv.k.dtype)
        v_new = to_storage(v.reshape(batch * t, *v.shape[2:]), kv.v.dtype)
        kv = KVPages(kv.k.at[layer, :, pages, slots].set(k_new),
                     kv.v.at[layer, :, pages, slots].set(v_new))
        out = attention(q, kv.k, kv.v, page_table, positions, kv_lens,
                        sliding_window=config.sliding_window, mesh=mesh, layer=layer)
        return out, kv

    hidden, new_kv = model.apply({"params": params}, tokens, jnp.maximum(positions, 0), attend, kv)
    last = jnp.argmax(positions, axis=1)  # each row's last real token
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return model, hidden, new_kv


@functools.partial(jax.jit, static_argnames=("config", "mesh", "attention"),
                   donate_argnames=("kv",))
def step(params, kv: KVPages,
         tokens: jax.Array,  # i32[batch, t]
         positions: jax.Array,  # i32[batch, t]; -1 = padding
         page_table: jax.Array,  # i32[batch, pages_per_seq]
         sampling: SamplingArrays,
         *, config: ModelConfig, mesh: Mesh | None, attention):
    """-> (next tokens i32[batch], their logprobs f32[batch], updated pages)."""
    model, hidden, new_kv = hidden_and_pages(params, kv, tokens, positions, page_table,
                                             config=config, mesh=mesh, attention=attention)
    logits = model.apply({"params": params}, hidden, method=LlamaModel.logits)
    next_tokens, logprobs = sample(logits, sampling)
    return next_tokens, logprobs, new_kv


@functools.partial(jax.jit, static_argnames=("config", "mesh", "attention"),
                   donate_argnames=("kv",))
def step_logits(params, kv: KVPages, tokens, positions, page_table, *, config: ModelConfig,
                mesh: Mesh | None, attention):
    """Like `step` but returns f32[batch, vocab] logits (tests and scoring)."""
    model, hidden, new_kv = hidden_and_pages(params, kv, tokens, positions, page_table,
                                             config=config, mesh=mesh, attention=attention)
    return model.apply({"params": params}, hidden, method=LlamaModel.logits), new_kv
