"""Straightforward batched generation: one prefill, then decode steps over a contiguous cache.

No pages, no scheduler: a second, independent path through the model that the paged engine is
checked against (and that the HF parity tests use). Prompts are right-padded to a power-of-two
bucket so compilations stay bounded; sampling is the engine's on-device `sample`.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxpd.engine.buckets import pow2_bucket
from jaxpd.engine.sampling import SamplingParams, sample, sampling_arrays
from jaxpd.errors import ConfigError
from jaxpd.model import forward
from jaxpd.model.config import ModelConfig


@functools.partial(jax.jit, static_argnames=("max_seq", "sharding"))
def _grow_cache(kv: forward.StackedKV, *, max_seq: int, sharding) -> forward.StackedKV:
    def pad(x):
        x = jnp.pad(x, ((0, 0), (0, 0), (0, max_seq - x.shape[2]), (0, 0), (0, 0)))
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
    return forward.StackedKV(pad(kv.k), pad(kv.v))


_sample = jax.jit(sample)


class Generator:
    """Generates continuations for a batch of token-id prompts with one model on one mesh."""

    def __init__(self, config: ModelConfig, params, mesh: Mesh | None = None):
        self.config, self.params, self.mesh = config, params, mesh

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams = SamplingParams(),
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """Generated ids per prompt (stop tokens included); `on_token(i, id)` streams them."""
        cfg = self.config
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        for p in prompts:
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ConfigError(f"token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
        longest = max(map(len, prompts))
        if longest + sampling.max_tokens > cfg.max_position_embeddings:
            raise ConfigError(
                f"prompt ({longest} tokens) + max_tokens ({sampling.max_tokens}) exceeds the model's "
                f"max_position_embeddings={cfg.max_position_embeddings}")
        batch = pow2_bucket(len(prompts), 1)
        seq = pow2_bucket(longest, 16)
        tokens = np.zeros((batch, seq), np.int32)
        lengths = np.ones((batch,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        out = forward.prefill(self.params, jnp.asarray(tokens), jnp.asarray(lengths),
                              config=cfg, mesh=self.mesh)
        kv_sharding = None if self.mesh is None else NamedSharding(self.mesh, forward.CACHE_SPEC)
        cache = _grow_cache(out.kv, max_seq=pow2_bucket(longest + sampling.max_tokens, 16),
                            sharding=kv_sharding)
        seed = sampling.seed or 0

        def draw(logits, step):
            arrays = sampling_arrays([sampling] * len(prompts), [seed] * len(prompts),
                                     [step] * len(prompts), batch)
            return _sample(logits, arrays)[0]

        next_tokens = draw(out.logits, 0)
        lengths_dev = jnp.asarray(lengths)
        results: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        stop = set(sampling.stop_token_ids)  # stop strings and EOS are the caller's business here
        for step in range(sampling.max_tokens):
            host_tokens = np.asarray(next_tokens)
            for i in range(len(prompts)):
                if not done[i]:
                    results[i].append(int(host_tokens[i]))
                    if on_token is not None:
                        on_token(i, int(host_tokens[i]))
                    done[i] = host_tokens[i] in stop
            if done.all() or step == sampling.max_tokens - 1:
                break
            logits, cache = forward.decode(self.params, next_tokens, cache, lengths_dev,
                                           config=cfg, mesh=self.mesh)
            lengths_dev = lengths_dev + 1
            next_tokens = draw(logits, step + 1)
        return results
