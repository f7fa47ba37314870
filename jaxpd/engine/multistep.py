"""Several decode steps in one jitted call: sample, write K/V and check stops on device.

Each dispatch costs host time (building arrays, launching, fetching the tokens), paid once per
step when decoding one token at a time. Here a `while_loop` runs up to `num_steps` decode steps
per call: every row feeds the token it just sampled back in at the next position, and stops on
device when it draws a stop id or uses up its budget (its max_tokens, or the pages reserved
for it); a stopped row's later steps are padding (position -1, written to the null page). The
loop ends as soon as every row stopped. Sampling counters advance by one per token drawn, so
seeded sampling draws the same tokens whatever the number of steps per call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxpd.engine.model_step import hidden_and_pages
from jaxpd.engine.sampling import SamplingArrays, sample
from jaxpd.kv.pool import KVPages, page_sharding
from jaxpd.model.config import ModelConfig
from jaxpd.model.llama import LlamaModel


def _keep_pool_layout(kv: KVPages, mesh: Mesh | None) -> KVPages:
    """Pin the loop-carried pool to its sharded layout, so no step reshards it."""
    sharding = page_sharding(mesh)
    if sharding is None:
        return kv
    return KVPages(*(jax.lax.with_sharding_constraint(x, sharding) for x in kv))


@functools.partial(jax.jit, static_argnames=("config", "mesh", "attention", "num_steps"),
                   donate_argnames=("kv",))
def decode_steps(params, kv: KVPages,
                 tokens: jax.Array,  # i32[batch]: each row's last token (its KV not yet written)
                 positions: jax.Array,  # i32[batch]: that token's position
                 page_table: jax.Array,  # i32[batch, pages_per_seq]: pages for the whole budget
                 sampling: SamplingArrays,  # counters = tokens drawn before this call
                 budgets: jax.Array,  # i32[batch]: most tokens a row may draw; 0 = padding row
                 stop_ids: jax.Array,  # i32[batch, n]: ids that end a row (after it); -1 pads
                 *, config: ModelConfig, mesh: Mesh | None, attention, num_steps: int):
    """-> (tokens i32[batch, num_steps], logprobs f32[batch, num_steps], valid i32[batch],
    updated pages, last i32[batch], stopped bool[batch]); row b's tokens are
    `tokens[b, :valid[b]]`, the rest are zeros. `last` (each row's newest token) and
    `stopped` (it ended on a stop id) stay on device to feed the next call (`feed_forward`)."""
    batch = tokens.shape[0]

    def running(carry):
        step, _, _, _, done, _, _ = carry
        return (step < num_steps) & ~jnp.all(done)

    def one_step(carry):
        step, kv, current, drawn, done, out_tokens, out_logprobs = carry
        pos = jnp.where(done, -1, positions + drawn)[:, None]
        model, hidden, kv = hidden_and_pages(params, kv, current[:, None], pos, page_table,
                                             config=config, mesh=mesh, attention=attention)
        logits = model.apply({"params": params}, hidden, method=LlamaModel.logits)
        new, logprobs = sample(logits, sampling._replace(counters=sampling.counters + drawn))
        new = jnp.where(done, 0, new)
        out_tokens = out_tokens.at[:, step].set(new)
        out_logprobs = out_logprobs.at[:, step].set(jnp.where(done, 0.0, logprobs))
        drawn = drawn + (~done).astype(jnp.int32)
        stopped = jnp.any(new[:, None] == stop_ids, axis=1) | (drawn >= budgets)
        return (step + 1, _keep_pool_layout(kv, mesh), jnp.where(done, current, new), drawn,
                done | stopped, out_tokens, out_logprobs)

    init = (jnp.int32(0), kv, tokens, jnp.zeros(batch, jnp.int32), budgets <= 0,
            jnp.zeros((batch, num_steps), jnp.int32), jnp.zeros((batch, num_steps), jnp.float32))
    _, kv, last, drawn, _, out_tokens, out_logprobs = jax.lax.while_loop(running, one_step, init)
    stopped = jnp.any(last[:, None] == stop_ids, axis=1)
    return out_tokens, out_logprobs, drawn, kv, last, stopped


@jax.jit
def feed_forward(prev_last: jax.Array,  # i32[prev_batch]: the previous call's `last`
                 prev_stopped: jax.Array,  # bool[prev_batch]
                 rows: jax.Array,  # i32[batch]: each row's row in the previous call, -1 if none
                 tokens: jax.Array,  # i32[batch]: host-known input tokens (new rows)
                 budgets: jax.Array,  # i32[batch]
                 ) -> tuple[jax.Array, jax.Array]:
    """Inputs of a call dispatched before the previous one's tokens reached the host: rows that
    were in it take its newest token from the device, and draw nothing if it ended them."""
    carried = rows >= 0
    source = jnp.maximum(rows, 0)
    tokens = jnp.where(carried, prev_last[source], tokens)
    budgets = jnp.where(carried & prev_stopped[source], 0, budgets)
    return tokens, budgets
