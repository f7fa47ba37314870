"""Runs the jitted paged step for a batch of sequence slices on one mesh.

Turns Python-side sequences into padded device arrays (batch, chunk and page-table widths all
bucketed), calls `model_step.step`, and hands back host tokens and logprobs. The page pool is
threaded through (donated), so it stays on device and is updated in place.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxpd.engine import attention as attention_lib
from jaxpd.engine import model_step
from jaxpd.engine.buckets import pow2_bucket
from jaxpd.engine.request import Sequence
from jaxpd.engine.sampling import sampling_arrays
from jaxpd.kv.manager import KVCacheManager
from jaxpd.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Slice:
    """Tokens `seq.tokens[start:start + length]` of one sequence, to run in this step."""

    seq: Sequence
    start: int
    length: int


class ModelRunner:
    def __init__(self, config: ModelConfig, params, mesh: Mesh | None, manager: KVCacheManager,
                 attention: str = "auto", *, min_chunk: int = 16):
        self.config, self.params, self.mesh, self.manager = config, params, mesh, manager
        self.backend = attention_lib.resolve(attention, head_dim=config.head_dim, dtype=config.dtype)
        self.min_chunk = min_chunk
        capacity = (manager.allocator.num_blocks - 1) * manager.page_size
        max_len = min(config.max_position_embeddings, capacity)
        self.max_pages_per_seq = pow2_bucket(manager.layout.pages_for(max_len))
        self.shapes_seen: set[tuple[int, int, int]] = set()  # (batch, chunk, pages) compiled
        self.tokens_computed = 0
        self.seconds = {"prefill": 0.0, "decode": 0.0, "first_calls": 0.0}  # wall time in steps
        # where a decode step's time goes (steps whose shape was already compiled): building
        # the host arrays, the jitted call returning (dispatch), waiting for and fetching results
        self.decode_breakdown = {"steps": 0, "host_s": 0.0, "dispatch_s": 0.0, "device_s": 0.0}

    def table_widths(self) -> list[int]:
        """Page-table widths a step can have: one when the backend's cost follows the pages used,
        else every power of two up to the widest."""
        if self.backend.fixed_table_width:
            return [self.max_pages_per_seq]
        return [1 << i for i in range(self.max_pages_per_seq.bit_length())]

    def precompile(self, batch: int, chunk: int) -> int:
        """Compile (by running) every step shape with this batch and chunk bucket: all rows are
        padding, so only the null page is written. Returns how many shapes were new."""
        new = 0
        for pps in self.table_widths():
            shape = (batch, chunk, pps)
            if shape in self.shapes_seen:
                continue
            start = time.perf_counter()
            sampling = sampling_arrays([], [], [], batch)
            attention = self.backend.decode if chunk == 1 else self.backend.prefill
            out = model_step.step(
                self.params, self.manager.kv, jnp.zeros((batch, chunk), jnp.int32),
                jnp.full((batch, chunk), -1, jnp.int32), jnp.zeros((batch, pps), jnp.int32),
                sampling, config=self.config, mesh=self.mesh, attention=attention)
            self.manager.kv = out[2]
            jax.block_until_ready(out[0])
            self.seconds["first_calls"] += time.perf_counter() - start
            self.shapes_seen.add(shape)
            new += 1
        return new

    def run(self, slices: list[Slice], *, batch_bucket_max: int | None = None):
        """(next tokens, logprobs) as host arrays, one per slice (sampled at each slice's end)."""
        entered = time.perf_counter()
        batch = pow2_bucket(len(slices), 1, batch_bucket_max)
        decode = all(s.length == 1 for s in slices)
        chunk = 1 if decode else pow2_bucket(max(s.length for s in slices), self.min_chunk)
        page_size = self.manager.page_size
        widest = max(len(s.seq.pages.pages) for s in slices)
        pps = self.max_pages_per_seq if self.backend.fixed_table_width else pow2_bucket(widest, 1)
        tokens = np.zeros((batch, chunk), np.int32)
        positions = np.full((batch, chunk), -1, np.int32)
        table = np.zeros((batch, pps), np.int32)
        for i, s in enumerate(slices):
            all_tokens = s.seq.tokens
            tokens[i, :s.length] = all_tokens[s.start:s.start + s.length]
            positions[i, :s.length] = np.arange(s.start, s.start + s.length)
            pages = s.seq.pages.pages
            table[i, :len(pages)] = pages
            assert len(pages) * page_size >= s.start + s.length, "pages not reserved"
        sampling = sampling_arrays([s.seq.request.sampling for s in slices],
                                   [s.seq.seed for s in slices],
                                   [len(s.seq.output_ids) for s in slices], batch)
        shape = (batch, chunk, pps)
        first_call = shape not in self.shapes_seen
        self.shapes_seen.add(shape)
        self.tokens_computed += sum(s.length for s in slices)
        start = time.perf_counter()
        next_tokens, logprobs, self.manager.kv = model_step.step(
            self.params, self.manager.kv, jnp.asarray(tokens), jnp.asarray(positions),
            jnp.asarray(table), sampling, config=self.config, mesh=self.mesh,
            attention=self.backend.decode if decode else self.backend.prefill)
        dispatched = time.perf_counter()
        next_tokens, logprobs = jax.device_get((next_tokens, logprobs))
        end = time.perf_counter()
        elapsed = end - start
        self.seconds["first_calls" if first_call else ("decode" if decode else "prefill")] += elapsed
        if decode and not first_call:
            b = self.decode_breakdown
            b["steps"] += 1
            b["host_s"] += start - entered
            b["dispatch_s"] += dispatched - start
            b["device_s"] += end - dispatched
        return next_tokens[:len(slices)], logprobs[:len(slices)]
