"""Runs the compiled paged step for a batch of sequence slices on one mesh.

Turns Python-side sequences into padded device arrays (batch, chunk and page-table widths all
bucketed), calls the step program compiled for that shape (`model_step.step`, or
`multistep.decode_steps` for several decode steps in one call; `programs.StepPrograms` holds
them), and hands back host tokens and logprobs. The page pool is threaded through (donated), so
it stays on device and is updated in place.

Two ways to meet a shape that is not compiled yet:
- `compile_on_demand` (the default, for in-process use): compile it on the spot, as jit would;
- otherwise (a serving worker, whose remaining shapes compile in the background): never
  compile on the request path. `fit` trims a step to what a ready program can run (fewer
  sequences, shorter chunks: chunked prefill finishes the rest next step), and a step runs
  padded up to the smallest ready shape that covers it, while the shape it wanted is moved to
  the front of the background queue.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxpd.engine import attention as attention_lib
from jaxpd.engine import model_step, multistep
from jaxpd.engine.buckets import DEFAULT_PREFILL_BATCH, MIN_CHUNK, bucket_for, pow2_bucket, pow2_sizes
from jaxpd.engine.programs import StepPrograms, StepShape
from jaxpd.engine.request import Sequence
from jaxpd.engine.sampling import SamplingArrays, sampling_arrays
from jaxpd.kv.pool import KVPages, page_sharding
from jaxpd.kv.manager import KVCacheManager
from jaxpd.model.config import ModelConfig
from jaxpd.transfer import wire

STOP_ID_WIDTH = 8  # stop-id columns of a multi-step call (more only for requests with more)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LaunchedSteps:
    """A multi-step decode call on its way: device results not yet fetched."""

    seqs: list[Sequence]
    budgets: list[int]
    outputs: tuple  # device arrays: tokens [b, k], logprobs [b, k], valid [b]
    last: jax.Array  # i32[b] each row's newest token, for the next call
    stopped: jax.Array  # bool[b] the row ended on a stop id
    times: tuple[float, float, float]  # entered, started the call, call returned
    launch: int = 0  # the runner's count of launches: a later call feeds from it by number


@dataclasses.dataclass(frozen=True)
class Slice:
    """Tokens `seq.tokens[start:start + length]` of one sequence, to run in this step."""

    seq: Sequence
    start: int
    length: int


class ModelRunner:
    def __init__(self, config: ModelConfig, params, mesh: Mesh | None, manager: KVCacheManager,
                 attention: str = "auto", *, min_chunk: int = MIN_CHUNK):
        self.config, self.params, self.mesh, self.manager = config, params, mesh, manager
        self.backend = attention_lib.resolve(attention, head_dim=config.head_dim,
                                             dtype=config.dtype, kv_dtype=manager.layout.dtype)
        self.min_chunk = min_chunk
        capacity = (manager.allocator.num_blocks - 1) * manager.page_size
        max_len = min(config.max_position_embeddings, capacity)
        self.max_pages_per_seq = pow2_bucket(manager.layout.pages_for(max_len))
        # the sizes that get programs; the prefill and decode engines set their own
        self.prefill_batch_sizes = pow2_sizes(DEFAULT_PREFILL_BATCH)
        self.decode_batch_sizes = pow2_sizes(64)
        self.chunk_sizes = pow2_sizes(256, min_chunk)
        self.programs = StepPrograms(self._lower)
        # False once a worker serves: shapes that are not ready are padded or split, never
        # compiled on the request path (`fit`, `_program`)
        self.compile_on_demand = True
        self.request_path_compiles = 0  # programs compiled inside run/launch_steps
        self.tokens_computed = 0
        self.seconds = {"prefill": 0.0, "decode": 0.0, "compile": 0.0}  # wall time in steps
        # where decode time goes: building the host arrays, the call returning (dispatch),
        # waiting for and fetching results; a multi-step call is one dispatch of several steps
        self.decode_breakdown = {"dispatches": 0, "steps": 0, "host_s": 0.0, "dispatch_s": 0.0,
                                 "device_s": 0.0}
        # A multi-host replica's leader sets this: every device op is published (op, static
        # values, host arrays) to the other hosts before it runs here, so they run the same
        # programs in the same order (`jaxpd.serving.multihost`). None on one host.
        self.lockstep: Callable[..., None] | None = None
        self._launches = 0
        self._launched: dict[int, tuple[jax.Array, jax.Array]] = {}  # launch -> (last, stopped)
        spans_processes = mesh is not None and not all(
            d.process_index == jax.process_index() for d in mesh.devices.flat)
        self._replicated = NamedSharding(mesh, PartitionSpec()) if spans_processes else None
        self._by_host = _host_head_sharding(mesh) if spans_processes else None
        # KV arriving at a multi-host replica: "scatter" sends each host only the KV heads its
        # devices hold (the default), "broadcast" sends every host all of them (measured in
        # docs/benchmarks.md)
        self.kv_delivery = "scatter"

    def table_widths(self) -> list[int]:
        """Page-table widths a step can have, widest first: one when the backend's cost follows
        the pages used, else every power of two up to the widest."""
        if self.backend.fixed_table_width:
            return [self.max_pages_per_seq]
        return [1 << i for i in reversed(range(self.max_pages_per_seq.bit_length()))]

    # -- compiling ----------------------------------------------------------------------------
    def _lower(self, shape: StepShape) -> jax.stages.Lowered:
        """Trace and lower one step program from shapes alone (nothing runs, the pool is not
        touched), so a background thread can compile while this runner serves."""
        replicated = (SingleDeviceSharding(jax.devices()[0]) if self.mesh is None
                      else NamedSharding(self.mesh, PartitionSpec()))

        def arg(shape_, dtype):
            return jax.ShapeDtypeStruct(shape_, dtype, sharding=replicated)

        def spec(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        pool = self.manager.kv
        pool_sharding = page_sharding(self.mesh) or replicated
        kv = KVPages(*(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=pool_sharding) for x in pool))
        params = jax.tree.map(spec, self.params)
        b, i32 = shape.batch, jnp.int32
        sampling = SamplingArrays(arg((b,), jnp.float32), arg((b,), i32), arg((b,), jnp.float32),
                                  arg((b, 2), jnp.uint32), arg((b,), i32))
        table = arg((b, shape.pages), i32)
        if shape.kind == "step":
            attention = self.backend.decode if shape.tokens == 1 else self.backend.prefill
            tokens = arg((b, shape.tokens), i32)
            return model_step.step.lower(params, kv, tokens, tokens, table, sampling,
                                         config=self.config, mesh=self.mesh, attention=attention)
        row = arg((b,), i32)
        return multistep.decode_steps.lower(
            params, kv, row, row, table, sampling, row, arg((b, shape.stops), i32),
            config=self.config, mesh=self.mesh, attention=self.backend.decode,
            num_steps=shape.tokens)

    def _program(self, shape: StepShape) -> jax.stages.Compiled:
        """The ready program for `shape`. One that is not ready is compiled here, on the request
        path: expected with `compile_on_demand`; otherwise only for a shape that no ready
        program covers (`fit` makes that rare) and logged."""
        program = self.programs.get(shape)
        if program is not None:
            return program
        if not self.compile_on_demand:
            log.info("compiling %s on the request path: no ready program covers it", shape)
        started = time.perf_counter()
        program = self.programs.compile(shape)
        self.seconds["compile"] += time.perf_counter() - started
        self.request_path_compiles += 1
        return program

    def _choose(self, wanted: StepShape) -> StepShape:
        """The shape to run `wanted`'s work with: itself when ready (or compiled on demand),
        else the ready shape that covers it with the least padding, else itself."""
        if self.compile_on_demand or wanted in self.programs:
            return wanted
        covering = [s for s in self.programs.ready() if s.covers(wanted)]
        self.programs.prefer(wanted)
        if not covering:
            return wanted
        return min(covering, key=lambda s: (s.area, s.pages, s.stops, s.batch))

    def step_shape(self, slices: list[Slice], *, decode: bool = False) -> StepShape:
        """The bucketed shape a single-step call over `slices` wants: a decode step (one token
        per row, `decode_batch_sizes`) or a prefill chunk batch (`prefill_batch_sizes` x
        `chunk_sizes`; a batch of one-token slices runs as the smallest chunk)."""
        width = self._table_width(max(len(s.seq.pages.pages) for s in slices))
        if decode:
            return StepShape("step", bucket_for(len(slices), self.decode_batch_sizes), 1, width)
        return StepShape("step", bucket_for(len(slices), self.prefill_batch_sizes),
                         bucket_for(max(s.length for s in slices), self.chunk_sizes), width)

    def fit(self, slices: list[Slice], *, decode: bool = False) -> list[Slice]:
        """`slices` trimmed to what one ready program can run without compiling (all of them
        when some ready program covers them, or when compiling on demand): the ready shape
        that computes the most of their tokens, taking sequences in order and cutting each to
        its chunk length. Trimmed prompts finish in later steps, as chunked prefill does."""
        if not slices or self.compile_on_demand:
            return slices
        wanted = self.step_shape(slices, decode=decode)
        if self._choose(wanted) in self.programs:  # ready, or padded up to a ready one
            return slices
        best, best_tokens = None, 0
        for shape in self.programs.ready():
            if shape.kind != "step" or shape.pages < wanted.pages:
                continue
            tokens = sum(min(s.length, shape.tokens) for s in slices[:shape.batch])
            if best is None or (tokens, -shape.area) > (best_tokens, -best.area):
                best, best_tokens = shape, tokens
        if best is None:
            return slices  # nothing fits: `run` compiles (logged)
        return [Slice(s.seq, s.start, min(s.length, best.tokens)) for s in slices[:best.batch]]

    def decode_rows(self, seqs: list[Sequence], num_steps: int, eos_ids: tuple[int, ...]) -> int:
        """How many of `seqs` (in order) one multi-step call can run on a ready program: all of
        them when compiling on demand or when a ready program covers them, else as many as the
        widest ready batch holds."""
        if self.compile_on_demand:
            return len(seqs)
        wanted = self._steps_shape(seqs, num_steps, eos_ids)
        ready = [s for s in self.programs.ready() if s.covers(dataclasses.replace(wanted, batch=1))]
        if any(s.batch >= wanted.batch for s in ready):
            return len(seqs)
        self.programs.prefer(wanted)
        return max((s.batch for s in ready), default=len(seqs))

    def _steps_shape(self, seqs: list[Sequence], num_steps: int,
                     eos_ids: tuple[int, ...]) -> StepShape:
        stops = max(len(seq.stop_ids(eos_ids)) for seq in seqs)
        return StepShape("steps", bucket_for(len(seqs), self.decode_batch_sizes), num_steps,
                         self._table_width(max(len(seq.pages.pages) for seq in seqs)),
                         pow2_bucket(stops, STOP_ID_WIDTH))

    def step_shapes(self, batches: list[int], chunks: list[int]) -> list[StepShape]:
        """Single-step programs for every (batch, chunk) and page-table width, in that order."""
        return [StepShape("step", b, c, w) for b in batches for c in chunks
                for w in self.table_widths()]

    def decode_shapes(self, batches: list[int], num_steps: int) -> list[StepShape]:
        """Multi-step decode programs for every batch and page-table width (requests with up to
        STOP_ID_WIDTH stop ids, EOS included)."""
        return [StepShape("steps", b, num_steps, w, STOP_ID_WIDTH) for b in batches
                for w in self.table_widths()]

    def _table_width(self, widest: int) -> int:
        return self.max_pages_per_seq if self.backend.fixed_table_width else pow2_bucket(widest, 1)

    def run(self, slices: list[Slice], *, decode: bool = False):
        """(next tokens, logprobs) as host arrays, one per slice (sampled at each slice's end);
        `decode`: every slice is one token of a decoding sequence (a decode-shaped program)."""
        shape = self._choose(self.step_shape(slices, decode=decode))
        self._program(shape)  # compiled before the clock starts (and before followers hear of it)
        entered = time.perf_counter()
        batch, chunk = shape.batch, shape.tokens
        tokens = np.zeros((batch, chunk), np.int32)
        positions = np.full((batch, chunk), -1, np.int32)
        for i, s in enumerate(slices):
            tokens[i, :s.length] = s.seq.tokens[s.start:s.start + s.length]
            positions[i, :s.length] = np.arange(s.start, s.start + s.length)
        table = self._page_table([(s.seq, s.start + s.length) for s in slices], shape)
        sampling = sampling_arrays([s.seq.request.sampling for s in slices],
                                   [s.seq.seed for s in slices],
                                   [s.seq.num_drawn for s in slices], batch)
        self.tokens_computed += sum(s.length for s in slices)
        start = time.perf_counter()
        next_tokens, logprobs = self.call("step", {"shape": _shape_key(shape)}, {
            "tokens": tokens, "positions": positions, "table": table, **sampling._asdict()})
        dispatched = time.perf_counter()
        next_tokens, logprobs = jax.device_get((next_tokens, logprobs))
        end = time.perf_counter()
        self._account("decode" if decode else "prefill", (entered, start, dispatched, end), steps=1)
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
        shape = self._choose(self._steps_shape(seqs, num_steps, eos_ids))
        self._program(shape)
        entered = time.perf_counter()
        batch = shape.batch
        tokens = np.zeros(batch, np.int32)
        positions = np.zeros(batch, np.int32)
        budget = np.zeros(batch, np.int32)
        rows = np.full(batch, -1, np.int32)
        earlier = {id(seq): i for i, seq in enumerate(previous.seqs)} if previous else {}
        stop_ids = np.full((batch, shape.stops), -1, np.int32)
        for i, (seq, n) in enumerate(zip(seqs, budgets)):
            at = seq.expected_computed
            if seq.in_flight:
                rows[i] = earlier[id(seq)]  # its input token is still on device
            else:
                tokens[i] = seq.tokens[at]
            positions[i], budget[i] = at, n
            stops = seq.stop_ids(eos_ids)
            stop_ids[i, :len(stops)] = stops
        table = self._page_table([(seq, seq.expected_computed + n)
                                  for seq, n in zip(seqs, budgets)], shape)
        sampling = sampling_arrays([seq.request.sampling for seq in seqs], [seq.seed for seq in seqs],
                                   [seq.num_drawn + seq.in_flight for seq in seqs], batch)
        start = time.perf_counter()
        self._launches += 1
        feeds = previous is not None and bool((rows >= 0).any())
        out_tokens, logprobs, valid, last, stopped = self.call("steps", {
            "shape": _shape_key(shape), "launch": self._launches,
            "previous": previous.launch if feeds else None}, {
            "tokens": tokens, "positions": positions, "table": table, "budget": budget,
            "rows": rows, "stop_ids": stop_ids, **sampling._asdict()})
        return LaunchedSteps(list(seqs), list(budgets), (out_tokens, logprobs, valid), last,
                             stopped, (entered, start, time.perf_counter()), self._launches)

    def collect_steps(self, launched: LaunchedSteps):
        """Wait for a launched call: (tokens, logprobs, valid) as host arrays, one row per
        sequence it was launched with."""
        out_tokens, logprobs, valid = jax.device_get(launched.outputs)
        entered, start, dispatched = launched.times
        end = time.perf_counter()
        n = len(launched.seqs)
        self.tokens_computed += int(valid[:n].sum())
        self._account("decode", (entered, start, dispatched, max(end, dispatched)),
                      steps=int(valid.max()))
        return out_tokens[:n], logprobs[:n], valid[:n]

    # -- device ops: what a multi-host leader publishes and its followers replay -------------
    def call(self, op: str, static: dict, arrays: dict[str, np.ndarray],
             per_host: Callable[[int], dict[str, np.ndarray]] | None = None):
        """Run device op `op` here, first publishing it to the other hosts of a multi-host
        replica (`lockstep`). Followers call `execute` with what was published, so both sides
        run exactly this code. `per_host(i)`: arrays that differ by host (process) i."""
        if self.lockstep is not None:
            self.lockstep(op, static, arrays, per_host)
        if per_host is not None:
            arrays = {**arrays, **per_host(jax.process_index())}
        return self.execute(op, static, arrays)

    def execute(self, op: str, static: dict, arrays: dict[str, np.ndarray]):
        handler = self._OPS.get(op)
        if handler is None:
            raise ValueError(f"unknown device op {op!r}")
        return handler(self, static, arrays)

    def _global(self, x: np.ndarray):
        """A host array as this mesh's replicated input (one array over every process's devices
        when the mesh spans processes; each process passes the same values)."""
        if self._replicated is None:
            return x
        return jax.make_array_from_process_local_data(self._replicated, x)

    def _op_step(self, static: dict, arrays: dict) -> tuple[jax.Array, jax.Array]:
        program = self._program(StepShape(*static["shape"]))
        sampling = SamplingArrays(*(arrays[f] for f in SamplingArrays._fields))
        next_tokens, logprobs, self.manager.kv = program(
            self.params, self.manager.kv, arrays["tokens"], arrays["positions"], arrays["table"],
            sampling)
        return next_tokens, logprobs

    def _op_steps(self, static: dict, arrays: dict):
        program = self._program(StepShape(*static["shape"]))
        tokens, budget = arrays["tokens"], arrays["budget"]
        if static["previous"] is not None:
            if static["previous"] not in self._launched:
                raise RuntimeError(f"launch {static['previous']} is not among the recent ones")
            last, stopped = self._launched[static["previous"]]
            g = self._global
            tokens, budget = multistep.feed_forward(last, stopped, g(arrays["rows"]), g(tokens),
                                                    g(budget))
        sampling = SamplingArrays(*(arrays[f] for f in SamplingArrays._fields))
        out_tokens, logprobs, valid, self.manager.kv, last, stopped = program(
            self.params, self.manager.kv, tokens, arrays["positions"], arrays["table"], sampling,
            budget, arrays["stop_ids"])
        self._launched[static["launch"]] = (last, stopped)
        for old in [k for k in self._launched if k <= static["launch"] - 4]:
            del self._launched[old]  # a launch only ever feeds the next one
        return out_tokens, logprobs, valid, last, stopped

    def _op_write_kv(self, static: dict, arrays: dict) -> None:
        update = arrays["update"]
        if static.get("by_host"):  # this host's KV heads: one array over every host's slices
            update = jax.make_array_from_process_local_data(self._by_host, update,
                                                           tuple(static["shape"]))
        elif isinstance(update, jax.Array) and self.mesh is not None:  # pulled onto one device
            update = jax.device_put(update, NamedSharding(self.mesh, PartitionSpec()))
        else:
            update = self._global(update)
        self.manager.kv = wire.scatter_tokens(
            self.manager.kv, update, self._global(arrays["pages"]),
            self._global(arrays["slots"]), layout=self.manager.layout,
            layer_start=static["layer_start"])

    def _op_gather_kv(self, static: dict, arrays: dict) -> jax.Array:
        out = wire.gather_pages(self.manager.kv, self._global(arrays["pages"]),
                                layout=self.manager.layout)
        if self._replicated is not None:  # every head on every process: the leader reads it all
            out = _replicate(out, self._replicated)
        return out

    _OPS = {"step": _op_step, "steps": _op_steps, "write_kv": _op_write_kv,
            "gather_kv": _op_gather_kv}

    def write_kv(self, seq_pages: list[int], piece: wire.KVPiece) -> None:
        """Write a checked KV piece (canonical heads) into `seq_pages` of the pool."""
        update, pages, slots = wire.piece_arrays(self.manager.layout, seq_pages, piece)
        static = {"layer_start": piece.header.layer_start}
        hosts = jax.process_count() if self._by_host is not None else 1
        heads = update.shape[2]
        if hosts > 1 and self.kv_delivery == "scatter" and heads % hosts == 0:
            share = heads // hosts  # host i holds model heads [i*share, (i+1)*share)
            static.update(by_host=True, shape=list(update.shape))
            self.call("write_kv", static, {"pages": pages, "slots": slots},
                      per_host=lambda i: {"update": update[:, :, i * share:(i + 1) * share]})
            return
        self.call("write_kv", static, {"update": update, "pages": pages, "slots": slots})

    def gather_kv(self, seq_pages: list[int], start: int, end: int) -> tuple[jax.Array, int]:
        """Dispatch the gather of tokens [start, end) in the canonical wire layout; returns
        (device array every process of the leader can read, offset of `start` in it)."""
        pages, offset = wire.gather_index(self.manager.layout, seq_pages, start, end)
        return self.call("gather_kv", {}, {"pages": pages}), offset

    def kv_digest(self, seq_pages: list[int], num_tokens: int) -> tuple[int, int]:
        """(CRC-32C, bytes) of tokens [0, num_tokens) in the wire layout (`wire.digest`)."""
        arr, offset = self.gather_kv(seq_pages, 0, num_tokens)
        return wire.digest(arr, offset, num_tokens, self.manager.layout)

    def _page_table(self, needs: list[tuple[Sequence, int]], shape: StepShape) -> np.ndarray:
        """i32[batch, width] page table of `shape` for (sequence, tokens its pages must hold)
        pairs."""
        table = np.zeros((shape.batch, shape.pages), np.int32)
        for i, (seq, num_tokens) in enumerate(needs):
            pages = seq.pages.pages
            assert len(pages) * self.manager.page_size >= num_tokens, "pages not reserved"
            table[i, :len(pages)] = pages
        return table

    def _account(self, kind: str, times: tuple[float, float, float, float], *, steps: int) -> None:
        """Add a call's wall time (its compilation, if it had one, is in `seconds["compile"]`
        instead) to `seconds[kind]`; a decode call's split (host, dispatch, device + fetch)
        also goes to `decode_breakdown`, `steps` being the decode steps it ran."""
        entered, start, dispatched, end = times
        self.seconds[kind] += end - start
        if kind == "decode":
            b = self.decode_breakdown
            b["dispatches"] += 1
            b["steps"] += steps
            b["host_s"] += start - entered
            b["dispatch_s"] += dispatched - start
            b["device_s"] += end - dispatched


def _shape_key(shape: StepShape) -> list:
    """A step shape as JSON values (what a multi-host leader publishes)."""
    return [shape.kind, shape.batch, shape.tokens, shape.pages, shape.stops]


def _host_head_sharding(mesh: Mesh) -> NamedSharding:
    """A KV update [layers, 2, heads, tokens, head_dim] split over heads by process: the same
    devices as `mesh`, regrouped one row per process, so each host supplies its own heads."""
    devices = np.asarray(mesh.devices).reshape(-1)
    hosts = len({d.process_index for d in devices})
    grid = Mesh(devices.reshape(hosts, -1), ("hosts", "local"))
    return NamedSharding(grid, PartitionSpec(None, None, "hosts", None, None))


@functools.cache
def _copier(sharding: NamedSharding):
    return jax.jit(lambda x: x, out_shardings=sharding)


def _replicate(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """`x` resharded to `sharding` (every process holds all of it)."""
    return _copier(sharding)(x)
