"""On-device sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Each request carries its own key and a counter, so a seeded request draws the same tokens
whatever else shares its batch. The sort needed by top-k/top-p only runs when a row asks for it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpd.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping, as an OpenAI/vLLM user would pass them."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on detokenized text
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens} must be >= 1")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")


class SamplingArrays(NamedTuple):
    temperature: jax.Array  # f32[batch]; 0 = greedy
    top_k: jax.Array  # i32[batch]; 0 = off
    top_p: jax.Array  # f32[batch]; 1 = off
    keys: jax.Array  # u32[batch, 2]: raw threefry keys, one per request
    counters: jax.Array  # i32[batch]: tokens drawn so far (folded into the key)


def sampling_arrays(params: Sequence[SamplingParams], seeds: Sequence[int],
                    counters: Sequence[int], batch: int) -> SamplingArrays:
    """Host (numpy) arrays for a padded batch (rows past len(params) are greedy padding)."""
    t = np.zeros(batch, np.float32)
    k = np.zeros(batch, np.int32)
    p = np.ones(batch, np.float32)
    keys = np.zeros((batch, 2), np.uint32)
    c = np.zeros(batch, np.int32)
    for i, sp in enumerate(params):
        t[i], k[i], p[i] = sp.temperature, sp.top_k, sp.top_p
        keys[i] = (0, seeds[i] & 0xFFFFFFFF)
        c[i] = counters[i]
    return SamplingArrays(t, k, p, keys, c)  # host arrays: a multi-host leader ships them as is


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    keep = (before < top_p[:, None]) & (jnp.arange(vocab)[None, :] < k[:, None])
    keep = keep.at[:, 0].set(True)  # the likeliest token always stays, however small top_p is
    # Smallest kept logit is the threshold (the top entry is always kept).
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(threshold, kth)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: jax.Array,  # f32[batch, vocab]
           s: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """(i32[batch] tokens, f32[batch] log-probabilities under the unmodified distribution)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    sampled_rows = s.temperature > 0
    scaled = logits / jnp.where(sampled_rows, s.temperature, 1.0)[:, None]
    needs_filter = sampled_rows & ((s.top_k > 0) | (s.top_p < 1.0))
    scaled = jax.lax.cond(jnp.any(needs_filter),
                          lambda x: _filter_top_k_top_p(x, jnp.where(needs_filter, s.top_k, 0),
                                                        jnp.where(needs_filter, s.top_p, 1.0)),
                          lambda x: x, scaled)

    def draw(key_data, counter, row):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), counter)
        return jax.random.categorical(key, row)

    drawn = jax.vmap(draw)(s.keys, s.counters, scaled)
    tokens = jnp.where(sampled_rows, drawn, greedy).astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
