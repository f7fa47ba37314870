"""Runs the jitted paged step for a batch of sequence slices on one mesh.

Turns Python-side sequences into padded device arrays (batch, chunk and page-table widths all
bucketed), calls `model_step.step` (or `multistep.decode_steps` for several decode steps in one
call), and hands back host tokens and logprobs. The page pool is threaded through (donated), so
it stays on device and is updated in place.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxpd.engine import attention as attention_lib
from jaxpd.engine import model_step, multistep
from jaxpd.engine.buckets import pow2_bucket
from jaxpd.engine.request import Sequence
from jaxpd.engine.sampling import sampling_arrays
from jaxpd.kv.manager import KVCacheManager
from jaxpd.model.config import ModelConfig

STOP_ID_WIDTH = 8  # stop-id columns of a multi-step call (more only for requests with more)


@dataclasses.dataclass
class LaunchedSteps:
    """A multi-step decode call on its way: device results not yet fetched."""

    seqs: list[Sequence]
    budgets: list[int]
    outputs: tuple  # device arrays: tokens [b, k], logprobs [b, k], valid [b]
    last: jax.Array  # i32[b] each row's newest token, for the next call
    stopped: jax.Array  # bool[b] the row ended on a stop id
    first_call: bool  # its shape was compiled by this call
    times: tuple[float, float, float]  # entered, started the call, call returned


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
        # (batch, steps, pages, stop ids) compiled for multi-step decode
        self.multistep_shapes_seen: set[tuple[int, int, int, int]] = set()
        self.tokens_computed = 0
        self.seconds = {"prefill": 0.0, "decode": 0.0, "first_calls": 0.0}  # wall time in steps
        # where decode time goes (calls whose shape was already compiled): building the host
        # arrays, the jitted call returning (dispatch), waiting for and fetching results; a
        # multi-step call is one dispatch of several steps
        self.decode_breakdown = {"dispatches": 0, "steps": 0, "host_s": 0.0, "dispatch_s": 0.0,
                                 "device_s": 0.0}

    def table_widths(self) -> list[int]:
        """Page-table widths a step can have: one when the backend's cost follows the pages used,
        else every power of two up to the widest."""
        if self.backend.fixed_table_width:
            return [self.max_pages_per_seq]
        return [1 << i for i in range(self.max_pages_per_seq.bit_length())]

    def precompile(self, batch: int, chunk: int) -> int:
        """Compile (by running) every single-step shape with this batch and chunk bucket: all
        rows are padding, so only the null page is written. Returns how many shapes were new."""
        new = 0
        for pps in self.table_widths():
            shape = (batch, chunk, pps)
            if shape in self.shapes_seen:
                continue
            start = time.perf_counter()
            attention = self.backend.decode if chunk == 1 else self.backend.prefill
            out = model_step.step(
                self.params, self.manager.kv, jnp.zeros((batch, chunk), jnp.int32),
                jnp.full((batch, chunk), -1, jnp.int32), jnp.zeros((batch, pps), jnp.int32),
                sampling_arrays([], [], [], batch), config=self.config, mesh=self.mesh,
                attention=attention)
            self.manager.kv = out[2]
            jax.block_until_ready(out[0])
            self.seconds["first_calls"] += time.perf_counter() - start
            self.shapes_seen.add(shape)
            new += 1
        return new

    def precompile_steps(self, batch: int, num_steps: int) -> int:
        """`precompile` for the multi-step decode program (requests with up to STOP_ID_WIDTH
        stop ids, EOS included); every row has budget 0, so the loop runs no step."""
        new = 0
        for pps in self.table_widths():
            shape = (batch, num_steps, pps, STOP_ID_WIDTH)
            if shape in self.multistep_shapes_seen:
                continue
            start = time.perf_counter()
            zeros = jnp.zeros(batch, jnp.int32)
            out = multistep.decode_steps(
                self.params, self.manager.kv, zeros, zeros, jnp.zeros((batch, pps), jnp.int32),
                sampling_arrays([], [], [], batch), zeros,
                jnp.full((batch, STOP_ID_WIDTH), -1, jnp.int32), config=self.config,
                mesh=self.mesh, attention=self.backend.decode, num_steps=num_steps)
            self.manager.kv = out[3]
            jax.block_until_ready(out[0])
            self.seconds["first_calls"] += time.perf_counter() - start
            self.multistep_shapes_seen.add(shape)
            new += 1
        return new

    def run(self, slices: list[Slice], *, batch_bucket_max: int | None = None):
        """(next tokens, logprobs) as host arrays, one per slice (sampled at each slice's end)."""
        entered = time.perf_counter()
        batch = pow2_bucket(len(slices), 1, batch_bucket_max)
        decode = all(s.length == 1 for s in slices)
        chunk = 1 if decode else pow2_bucket(max(s.length for s in slices), self.min_chunk)
        tokens = np.zeros((batch, chunk), np.int32)
        positions = np.full((batch, chunk), -1, np.int32)
        for i, s in enumerate(slices):
            tokens[i, :s.length] = s.seq.tokens[s.start:s.start + s.length]
            positions[i, :s.length] = np.arange(s.start, s.start + s.length)
        table = self._page_table([(s.seq, s.start + s.length) for s in slices], batch)
        sampling = sampling_arrays([s.seq.request.sampling for s in slices],
                                   [s.seq.seed for s in slices],
                                   [len(s.seq.output_ids) for s in slices], batch)
        shape = (batch, chunk, table.shape[1])
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
        kind = "first_calls" if first_call else ("decode" if decode else "prefill")
        self._account(kind, (entered, start, dispatched, end), steps=1)
        return next_tokens[:len(slices)], logprobs[:len(slices)]

    def run_steps(self, seqs: list[Sequence], budgets: list[int], num_steps: int,
                  eos_ids: tuple[int, ...]):
        """Up to `num_steps` decode steps in one call: (tokens [n, num_steps], logprobs
        [n, num_steps], valid counts [n]) as host arrays. Sequence i feeds its last token and
        draws at most `budgets[i]` tokens (its pages must hold them), ending early after one of
        its stop ids; its tokens are `tokens[i, :valid[i]]`."""
        return self.collect_steps(self.launch_steps(seqs, budgets, num_steps, eos_ids))

    def launch_steps(self, seqs: list[Sequence], budgets: list[int], num_steps: int,
                     eos_ids: tuple[int, ...], previous: LaunchedSteps | None = None
                     ) -> LaunchedSteps:
        """Dispatch `run_steps`'s call without waiting for it. Each sequence starts from its
        `expected_computed` position; one that was in `previous` (still in flight) takes its
        input token from that call's results on device (`multistep.feed_forward`)."""
        entered = time.perf_counter()
        batch = pow2_bucket(len(seqs), 1)
        stops = [seq.stop_ids(eos_ids) for seq in seqs]
        tokens = np.zeros(batch, np.int32)
        positions = np.zeros(batch, np.int32)
        budget = np.zeros(batch, np.int32)
        rows = np.full(batch, -1, np.int32)
        earlier = {id(seq): i for i, seq in enumerate(previous.seqs)} if previous else {}
        stop_ids = np.full((batch, pow2_bucket(max(map(len, stops)), STOP_ID_WIDTH)), -1, np.int32)
        for i, (seq, n) in enumerate(zip(seqs, budgets)):
            at = seq.expected_computed
            if seq.in_flight:
                rows[i] = earlier[id(seq)]  # its input token is still on device
            else:
                tokens[i] = seq.tokens[at]
            positions[i], budget[i] = at, n
            stop_ids[i, :len(stops[i])] = stops[i]
        table = self._page_table([(seq, seq.expected_computed + n)
                                  for seq, n in zip(seqs, budgets)], batch)
        sampling = sampling_arrays([seq.request.sampling for seq in seqs], [seq.seed for seq in seqs],
                                   [len(seq.output_ids) + seq.in_flight for seq in seqs], batch)
        shape = (batch, num_steps, table.shape[1], stop_ids.shape[1])
        first_call = shape not in self.multistep_shapes_seen
        self.multistep_shapes_seen.add(shape)
        start = time.perf_counter()
        tokens_in, budget_in = jnp.asarray(tokens), jnp.asarray(budget)
        if previous is not None and (rows >= 0).any():
            tokens_in, budget_in = multistep.feed_forward(
                previous.last, previous.stopped, jnp.asarray(rows), tokens_in, budget_in)
        out_tokens, logprobs, valid, self.manager.kv, last, stopped = multistep.decode_steps(
            self.params, self.manager.kv, tokens_in, jnp.asarray(positions),
            jnp.asarray(table), sampling, budget_in, jnp.asarray(stop_ids),
            config=self.config, mesh=self.mesh, attention=self.backend.decode,
            num_steps=num_steps)
        return LaunchedSteps(list(seqs), list(budgets), (out_tokens, logprobs, valid), last,
                             stopped, first_call, (entered, start, time.perf_counter()))

    def collect_steps(self, launched: LaunchedSteps):
        """Wait for a launched call: (tokens, logprobs, valid) as host arrays, one row per
        sequence it was launched with."""
        out_tokens, logprobs, valid = jax.device_get(launched.outputs)
        entered, start, dispatched = launched.times
        end = time.perf_counter()
        n = len(launched.seqs)
        self.tokens_computed += int(valid[:n].sum())
        kind = "first_calls" if launched.first_call else "decode"
        self._account(kind, (entered, start, dispatched, max(end, dispatched)),
                      steps=int(valid.max()))
        return out_tokens[:n], logprobs[:n], valid[:n]

    def _page_table(self, needs: list[tuple[Sequence, int]], batch: int) -> np.ndarray:
        """i32[batch, width] page table for (sequence, tokens its pages must hold) pairs; the
        width is bucketed unless the backend's cost ignores it."""
        widest = max(len(seq.pages.pages) for seq, _ in needs)
        pps = self.max_pages_per_seq if self.backend.fixed_table_width else pow2_bucket(widest, 1)
        table = np.zeros((batch, pps), np.int32)
        for i, (seq, num_tokens) in enumerate(needs):
            pages = seq.pages.pages
            assert len(pages) * self.manager.page_size >= num_tokens, "pages not reserved"
            table[i, :len(pages)] = pages
        return table

    def _account(self, kind: str, times: tuple[float, float, float, float], *, steps: int) -> None:
        """Add a call's wall time to `seconds[kind]`; a compiled decode call's split (host,
        dispatch, device + fetch) also goes to `decode_breakdown`, `steps` being the decode
        steps it ran."""
        entered, start, dispatched, end = times
        self.seconds[kind] += end - start
        if kind == "decode":
            b = self.decode_breakdown
            b["dispatches"] += 1
            b["steps"] += steps
            b["host_s"] += start - entered
            b["dispatch_s"] += dispatched - start
            b["device_s"] += end - dispatched
