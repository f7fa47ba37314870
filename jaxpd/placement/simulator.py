"""Discrete-event simulation of a serving deployment, to check a placement against the whole
length distribution and the arrival process rather than their means.

What it models, mirroring jaxpd's router and engines:
- The request path (`request_path_s`: router check and tokenization, gRPC hops, streaming the
  first token back) delays each request before the router places it, so it counts in TTFT.
- Router: at arrival a request reserves KV for its whole sequence (prompt + output tokens) on the
  decode (or colocated) replica with the most free KV tokens (when the role's groups differ in
  `weight`: of the replicas with room, the one holding the fewest requests per unit of weight,
  as jaxpd's router does); when none has room it waits in one
  FCFS queue (no overtaking) until a finishing request frees enough, as jaxpd's router does: a
  request that finds `max_queued` already waiting, or waits past `queue_timeout_s`, is refused
  (RESOURCE_EXHAUSTED there; here it never runs: an SLO miss, counted in `rejected`). A request
  larger than one replica's whole KV capacity can never run: it is dropped (an SLO miss).
  Disaggregated: the prompt goes to the prefill replica with the shortest queue (waiting plus
  in-flight prompts, per unit of its group's weight; ties to the lowest index).
- Groups: a role may have several groups of replicas (`prefill_groups`, `decode_groups`: other
  pools or TP degrees beside the first), each with its own latency model, KV capacity, decode
  batch limit and routing weight.
- Prefill replica, with `chunk_size` (what jaxpd's engine does): each step takes, in arrival
  order, up to `max_prefill_seqs` prompts and from each its next chunk of at most `chunk_size`
  tokens, until `max_prefill_tokens` are taken, or until the next chunk would make the padded
  step (below) exceed `max_prefill_tokens`; a prompt's first token is emitted at the end
  of the step that ran its last chunk. The step is priced at the shape the engine pads it to:
  the batch up to the next of `prefill_batch_buckets`, every chunk up to the next of
  `prefill_chunk_buckets` (padding rows are priced as chunks of that length; no buckets: no
  padding). Without `chunk_size` (0): FCFS batches of whole prompts up to
  `max_prefill_tokens` (at least one prompt, even a longer one). A new step starts as soon as
  the previous one ends.
- Disaggregated, the reservation is answered at once, as jaxpd's decode worker answers it
  while its decode call runs; with `reserve_between_calls` it is made between two calls (a
  replica in the middle of a call of `decode_steps_per_dispatch` steps answers at the call's
  end), and only then does the prompt reach its prefill replica's queue.
- Shared host (`shared_host_slowdown` > 1): the prefill and decode replicas share one host's
  cores (jaxpd's CPU deployment), so a prefill step that starts while a decode replica is in
  a decode call takes that many times as long (measured: `tools/bench_engine.py
  --alongside-decode`). 1 (the default): each replica has devices of its own.
- KV hand-off: the request reaches its decode replica `kv_transfer_seconds(prompt)` after its
  prefill ends (the prefill side's model prices it: the placer builds it knowing both ends).
- Prefix-cache hits: a request's `cached_tokens` (from a trace) are never computed, sent or
  given new pages: its prefill starts after them and its hand-off carries the rest, as when
  jaxpd's router finds the replicas holding a conversation's earlier turns (prefix affinity;
  a miss, which the simulator does not model, computes them).
- Decode replica: continuous batching. All active sequences step together, one token each per
  step, priced at the next of `decode_batch_buckets` rows (as the engine pads). Arrivals join
  at the next call boundary (every `decode_steps_per_dispatch` steps), up to
  `max_decode_batch` (FCFS). A sequence needs `output_tokens - 1` decode steps (prefill made
  the first token) and frees its KV when it finishes.
- Colocated replica: one replica does both. When prompts wait it alternates one prefill step
  and one decode step, as the engine's step does (prefill one chunk batch, then decode); with
  `chunk_size` 0 the prefill step is a whole batch of prompts, so decode stalls longer. With no
  prompt waiting it decodes continuously. No KV transfer.

Speed: a decode replica runs a stretch of steps with an unchanged batch as one event (up to the
next finish, cut short at the step boundary after a new arrival), and prices it as
`k * (f(c0) + f(c0 + b (k - 1))) / 2` from the step times at its first and last context, which is
exact when the step time is affine in `context_tokens` (as in the cost model away from a roofline
knee). So the event count is a few per request, not one per token: 10k requests take well under
a second.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections import deque
from typing import Callable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from jaxpd.placement.workload import SimRequest

__all__ = ["LatencyModel", "SimDeployment", "SimGroup", "SimResult", "simulate", "goodput"]

Mode = Literal["disaggregated", "colocated"]
UNLIMITED_KV = 2**62


@runtime_checkable
class LatencyModel(Protocol):
    """Seconds per step of one replica; the cost model implements it per phase and pool."""

    def prefill_seconds(self, prompt_lengths: Sequence[int]) -> float:
        """One batched prefill step over these whole prompts."""
        ...

    def prefill_step_seconds(self, chunks: Sequence[tuple[int, int]]) -> float:
        """One chunked-prefill step: per sequence (tokens already computed, tokens now)."""
        ...

    def decode_step_seconds(self, batch: int, context_tokens: int) -> float:
        """One decode step of `batch` sequences holding `context_tokens` KV tokens in total."""
        ...

    def kv_transfer_seconds(self, prompt_tokens: int) -> float:
        """Prefill -> decode hand-off of one request's KV (0 when colocated)."""
        ...


@dataclasses.dataclass(frozen=True)
class SimGroup:
    """Replicas of one kind (a pool and TP degree) beside a role's first group."""

    model: LatencyModel
    replicas: int
    kv_capacity_tokens: int = UNLIMITED_KV  # decode or colocated: per replica
    max_decode_batch: int = 256  # decode or colocated
    weight: float = 1.0  # its share of the role's requests per replica (the YAML's `weight`)

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.kv_capacity_tokens < 1 or self.max_decode_batch < 1:
            raise ValueError(f"a group needs replicas, kv_capacity_tokens and max_decode_batch "
                             f">= 1, got {self}")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class SimDeployment:
    """Replicas, their latency models and engine limits. Colocated deployments set
    `prefill_replicas == decode_replicas` (the replica count; see `replicas`) and
    `prefill is decode`; `colocated()` and `disaggregated()` build either consistently."""

    mode: Mode
    prefill_replicas: int
    decode_replicas: int
    prefill: LatencyModel
    decode: LatencyModel
    max_prefill_tokens: int = 8192
    max_decode_batch: int = 256
    kv_capacity_tokens: int = UNLIMITED_KV  # per decode (or colocated) replica
    request_path_s: float = 0.0  # router, tokenization, gRPC hops: added to every TTFT
    max_queued: int = 1024  # serving.max_queued: requests the router holds while KV is full
    queue_timeout_s: float = 30.0  # serving.queue_timeout_s: the longest one of them waits
    chunk_size: int = 0  # scheduler.chunk_size: prompt tokens per sequence per step; 0 = whole
    max_prefill_seqs: int = 16  # sequences per chunked prefill step (the largest batch bucket)
    prefill_batch_buckets: tuple[int, ...] = ()  # the engine's compiled step shapes (ascending)
    prefill_chunk_buckets: tuple[int, ...] = ()
    decode_steps_per_dispatch: int = 1  # scheduler.decode_steps_per_dispatch: steps per call
    decode_batch_buckets: tuple[int, ...] = ()  # a decode step runs the next of these many rows
    # False (jaxpd): a decode worker answers a reservation at once, even while a decode call
    # runs (the engine thread does that host work while it waits for the device); True: only
    # between two calls, as jaxpd did before (and an engine doing all work between calls does)
    reserve_between_calls: bool = False
    shared_host_slowdown: float = 1.0  # a prefill step beside a busy decode replica: x this
    # further groups of a role beside the first (described by the fields above); colocated
    # deployments list theirs in decode_groups. Weights: the first groups' routing weights
    prefill_groups: tuple[SimGroup, ...] = ()
    decode_groups: tuple[SimGroup, ...] = ()
    prefill_weight: float = 1.0
    decode_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be 'disaggregated' or 'colocated', got {self.mode!r}")
        if self.request_path_s < 0:
            raise ValueError(f"request_path_s must be >= 0, got {self.request_path_s}")
        if self.shared_host_slowdown < 1:
            raise ValueError(f"shared_host_slowdown must be >= 1, got {self.shared_host_slowdown}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0, got {self.chunk_size}")
        for name in ("prefill_replicas", "decode_replicas", "max_prefill_tokens",
                     "max_decode_batch", "kv_capacity_tokens", "max_prefill_seqs",
                     "decode_steps_per_dispatch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mode == "colocated" and (self.prefill_replicas != self.decode_replicas
                                         or self.prefill is not self.decode
                                         or self.prefill_groups):
            raise ValueError("colocated: prefill_replicas must equal decode_replicas and "
                             "prefill must be decode (use SimDeployment.colocated; further "
                             "colocated groups go in decode_groups)")
        if not (self.prefill_weight > 0 and self.decode_weight > 0):
            raise ValueError("prefill_weight and decode_weight must be > 0")

    @classmethod
    def disaggregated(cls, prefill: LatencyModel, decode: LatencyModel, *,
                      prefill_replicas: int = 1, decode_replicas: int = 1,
                      **limits: int) -> SimDeployment:
        return cls("disaggregated", prefill_replicas, decode_replicas, prefill, decode, **limits)

    @classmethod
    def colocated(cls, model: LatencyModel, replicas: int = 1, **limits: int) -> SimDeployment:
        return cls("colocated", replicas, replicas, model, model, **limits)

    @property
    def replicas(self) -> int:
        """Replicas holding KV: decode replicas, or the colocated replicas."""
        return self.decode_replicas + sum(g.replicas for g in self.decode_groups)

    def decode_side(self) -> tuple[SimGroup, ...]:
        """Every group holding KV (decode, or colocated), the first from the main fields."""
        first = SimGroup(self.decode, self.decode_replicas, self.kv_capacity_tokens,
                         self.max_decode_batch, self.decode_weight)
        return (first, *self.decode_groups)

    def prefill_side(self) -> tuple[SimGroup, ...]:
        """Every disaggregated prefill group, the first from the main fields."""
        return (SimGroup(self.prefill, self.prefill_replicas, weight=self.prefill_weight),
                *self.prefill_groups)


@dataclasses.dataclass(frozen=True)
class SimResult:
    """Per-request times (absolute seconds; inf for dropped requests) and the derived metrics."""

    requests: tuple[SimRequest, ...]
    prefill_start_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    # when the router reserved the request's KV on a decode (or colocated) replica: the wait
    # before it is KV back-pressure, the wait after it (to prefill_start_s) the prefill queue
    placed_s: np.ndarray | None = None
    rejected: int = 0  # refused by the router: its queue was full, or the wait timed out
    prefill_busy_s: float = 0.0  # seconds in prefill steps, summed over replicas
    replica: np.ndarray | None = None  # the decode (or colocated) replica each request ran on
    # (numbered across the groups, the first group's first; -1: it never ran)

    def utilization(self, busy_s: float, replicas: int) -> float:
        """`busy_s` over `replicas` replicas' time from the first arrival to the last finish."""
        done = self.finish_s[np.isfinite(self.finish_s)]
        if not done.size or replicas < 1:
            return 0.0
        span = float(done.max() - min(r.arrival_s for r in self.requests))
        return busy_s / (span * replicas) if span > 0 else 0.0

    @property
    def arrival_s(self) -> np.ndarray:
        return np.array([r.arrival_s for r in self.requests], dtype=float)

    @property
    def ttft_s(self) -> np.ndarray:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> np.ndarray:
        """(finish - first token) / (output - 1): includes the KV hand-off; 0 for one token."""
        out = np.array([r.output_tokens for r in self.requests], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = (self.finish_s - self.first_token_s) / (out - 1)
        tpot[out <= 1] = 0.0
        tpot[~np.isfinite(self.finish_s)] = math.inf
        return tpot

    @property
    def e2e_s(self) -> np.ndarray:
        return self.finish_s - self.arrival_s

    @property
    def dropped(self) -> int:
        """Requests that never ran: larger than one replica's KV, or refused by the router."""
        return int(np.sum(~np.isfinite(self.finish_s)))

    def metric(self, name: str) -> np.ndarray:
        key = name.removesuffix("_s")
        if key not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"unknown metric {name!r} (ttft, tpot, e2e)")
        return getattr(self, key + "_s")

    def percentile(self, metric: str, q: float) -> float:
        """q in [0, 100], linear interpolation; inf when it reaches a dropped request."""
        values = np.sort(self.metric(metric))
        if values.size == 0:
            return math.nan
        pos = q / 100 * (values.size - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        if not math.isfinite(values[hi]):
            return math.inf
        return float(values[lo] + (values[hi] - values[lo]) * (pos - lo))

    def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        """Share of requests that meet both SLOs (DistServe's SLO attainment)."""
        if not self.requests:
            return 1.0
        return float(np.mean((self.ttft_s <= ttft_slo) & (self.tpot_s <= tpot_slo)))


# -- the simulation -----------------------------------------------------------------------------
ARRIVE, PREFILL_END, KV_ARRIVE, DECODE_END, ENQUEUE = range(5)


class _Replica:
    """State of one replica: a prefill queue, a decode batch, or both (colocated)."""

    __slots__ = ("index", "prefill_only", "model", "max_batch", "weight", "decode_step",
                 "queue", "load", "busy", "in_decode", "last_prefill", "free_kv", "holding",
                 "pending", "active", "context", "step", "finishes", "version",
                 "seg_t0", "seg_k", "seg_f0", "seg_batch", "seg_ctx")

    def __init__(self, index: int, group: SimGroup, prefill_only: bool = False) -> None:
        self.index = index
        self.prefill_only = prefill_only  # a disaggregated prefill replica
        self.model, self.max_batch, self.weight = group.model, group.max_decode_batch, group.weight
        self.decode_step = group.model.decode_step_seconds  # priced at the padded batch (below)
        self.holding = 0  # requests whose KV it holds (reserved, running or arriving)
        self.queue: deque[int] = deque()  # prompts waiting for prefill
        self.load = 0  # waiting + in-flight prompts (the router's queue length)
        self.busy = False  # a step is in flight
        self.in_decode = False  # ... and it is a decode stretch (can be cut short)
        self.last_prefill = False  # colocated: the last step was a prefill
        self.free_kv = 0 if prefill_only else group.kv_capacity_tokens
        self.pending: deque[int] = deque()  # arrived for decode, joining at the next boundary
        self.active = 0
        self.context = 0  # KV tokens of the active sequences
        self.step = 0  # decode steps completed
        self.finishes: list[tuple[int, int]] = []  # (step at which it finishes, request)
        self.version = 0  # invalidates a cut-short stretch's end event
        self.seg_t0 = self.seg_f0 = 0.0
        self.seg_k = self.seg_batch = self.seg_ctx = 0


class _Simulation:
    def __init__(self, dep: SimDeployment, requests: Sequence[SimRequest]) -> None:
        self.dep = dep
        self.colocated = dep.mode == "colocated"
        self.arrival = [r.arrival_s for r in requests]
        self.prompt = [r.prompt_tokens for r in requests]
        self.cached = [r.cached_tokens for r in requests]  # prefix-cache hits: never computed
        # KV a request takes on its replica: its new prompt tokens and its output (cached
        # blocks are shared pages already resident)
        self.need = [r.prompt_tokens - r.cached_tokens + r.output_tokens for r in requests]
        self.output = [r.output_tokens for r in requests]
        n = len(requests)
        self.prefill_start = [math.inf] * n
        self.computed = list(self.cached)  # prompt tokens in KV so far (chunked prefill)
        self.placed = [math.inf] * n
        self.first_token = [math.inf] * n
        self.finish = [math.inf] * n
        self.home = [-1] * n  # decode (or colocated) replica
        self.decoders = [_Replica(i, g) for i, g in enumerate(
            g for g in dep.decode_side() for _ in range(g.replicas))]
        self.prefillers = (self.decoders if self.colocated else [_Replica(i, g, True) for i, g in
                           enumerate(g for g in dep.prefill_side() for _ in range(g.replicas))])
        self.largest_kv = max(g.kv_capacity_tokens for g in dep.decode_side())
        self.pads = bool(dep.prefill_batch_buckets or dep.prefill_chunk_buckets)
        self.weighted = len({g.weight for g in dep.decode_side()}) > 1
        self.waiting: deque[int] = deque()  # requests waiting for KV room
        self.rejected = 0
        self.prefill_busy = 0.0
        self.events: list[tuple] = []  # (time, seq, kind, a, b); seq is unique, so b is never compared
        self.seq = 0
        if dep.decode_batch_buckets:  # priced at the padded batch the engine's program runs
            for r in self.decoders:
                r.decode_step = self.padded_step(r)

    def padded_step(self, r: _Replica) -> Callable[[int, int], float]:
        buckets, step = self.dep.decode_batch_buckets, r.model.decode_step_seconds
        rows = [next((b for b in buckets if b >= n), n)
                for n in range(r.max_batch + 1)]  # a batch never exceeds it
        return lambda batch, context: step(rows[batch], context)

    def push(self, t: float, kind: int, a: int, b: object = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def run(self) -> None:
        delay = self.dep.request_path_s  # the router sees it after the request path
        for rid, t in enumerate(self.arrival):
            self.push(t + delay, ARRIVE, rid)
        handlers = {ARRIVE: self.on_arrive, PREFILL_END: self.on_prefill_end,
                    KV_ARRIVE: self.on_kv_arrive, DECODE_END: self.on_decode_end,
                    ENQUEUE: self.on_enqueue}
        events = self.events
        while events:
            t, _, kind, a, b = heapq.heappop(events)
            handlers[kind](t, a, b)

    # -- router ------------------------------------------------------------------------------
    def on_arrive(self, t: float, rid: int, _: int) -> None:
        need = self.need[rid]
        if need > self.largest_kv:
            return  # never fits: dropped
        if self.waiting or not self.place(t, rid):
            if len(self.waiting) >= self.dep.max_queued:
                self.rejected += 1  # the router's queue is full: RESOURCE_EXHAUSTED
                return
            self.waiting.append(rid)

    def place(self, t: float, rid: int) -> bool:
        """Reserve KV on the replica with the most free tokens (groups of unequal weight: of
        those with room, the fewest requests held per unit of weight) and queue the prompt."""
        need = self.need[rid]
        if self.weighted:
            home = min((r for r in self.decoders if r.free_kv >= need), default=None,
                       key=lambda r: ((r.holding + 1) / r.weight, -r.free_kv))
        else:
            home = max(self.decoders, key=lambda r: r.free_kv)
        if home is None or home.free_kv < need:
            return False
        home.free_kv -= need
        home.holding += 1
        self.home[rid] = home.index
        self.placed[rid] = t
        answered = (self.call_boundary(t, home)
                    if self.dep.reserve_between_calls and not self.colocated else t)
        if answered > t:  # the decode engine answers the reservation after its call
            self.push(answered, ENQUEUE, rid)
        else:
            self.on_enqueue(t, rid, 0)
        return True

    def on_enqueue(self, t: float, rid: int, _: int) -> None:
        """The prompt joins its prefill replica's queue (the least loaded one)."""
        pre = (self.decoders[self.home[rid]] if self.colocated
               else min(self.prefillers, key=lambda r: r.load / r.weight))
        pre.queue.append(rid)
        pre.load += 1
        self.wake(t, pre)

    def call_boundary(self, t: float, r: _Replica) -> float:
        """When a decode replica's engine is next between calls, at or after t."""
        if not (r.busy and r.in_decode):
            return t
        steps = self.steps_before(t, r)
        return r.seg_t0 + self.stretch_seconds(r, steps)

    def steps_before(self, t: float, r: _Replica) -> int:
        """The steps of the current stretch run by the first call boundary at or after t
        (binary search; calls are `decode_steps_per_dispatch` steps, the stretch's last may be
        shorter)."""
        per = self.dep.decode_steps_per_dispatch
        lo, hi = 1, -(-r.seg_k // per)  # in calls
        while lo < hi:
            mid = (lo + hi) // 2
            if r.seg_t0 + self.stretch_seconds(r, min(mid * per, r.seg_k)) >= t:
                hi = mid
            else:
                lo = mid + 1
        return min(lo * per, r.seg_k)

    def release(self, t: float, rid: int) -> None:
        """A request finished: free its KV and let waiting requests in, in order."""
        self.finish[rid] = t
        home = self.decoders[self.home[rid]]
        home.free_kv += self.need[rid]
        home.holding -= 1
        while self.waiting:
            head = self.waiting[0]
            if t - self.arrival[head] - self.dep.request_path_s > self.dep.queue_timeout_s:
                self.waiting.popleft()  # waited past serving.queue_timeout_s: refused
                self.rejected += 1
                continue
            if not self.place(t, head):
                break
            self.waiting.popleft()

    def wake(self, t: float, r: _Replica) -> None:
        """New work for `r`: start it if idle, or end a decode stretch at the next boundary."""
        if not r.busy:
            self.boundary(t, r)
        elif r.in_decode:
            self.cut(t, r)

    # -- prefill -----------------------------------------------------------------------------
    def start_prefill(self, t: float, r: _Replica) -> None:
        """One step: chunks of the first prompts (chunk_size), else FCFS whole prompts up to
        the token budget (at least one)."""
        budget, batch = self.dep.max_prefill_tokens, []
        if self.dep.chunk_size:
            chunks, longest = [], 0
            for rid in itertools.islice(r.queue, self.dep.max_prefill_seqs):
                done = self.computed[rid]
                length = min(self.prompt[rid] - done, self.dep.chunk_size, budget)
                if length <= 0:
                    break
                if chunks and self.pads and self.padded_tokens(
                        len(chunks) + 1, max(longest, length)) > self.dep.max_prefill_tokens:
                    break  # as the engine: a chunk joins while the padded step fits the budget
                longest = max(longest, length)
                if math.isinf(self.prefill_start[rid]):
                    self.prefill_start[rid] = t
                batch.append((rid, length))
                chunks.append((done, length))
                budget -= length
            seconds = r.model.prefill_step_seconds(self.padded(chunks))
        else:
            new = lambda rid: self.prompt[rid] - self.cached[rid]  # noqa: E731
            while r.queue and (not batch or budget >= new(r.queue[0])):
                rid = r.queue.popleft()
                batch.append((rid, new(rid)))
                budget -= new(rid)
                self.prefill_start[rid] = t
            if any(self.cached[rid] for rid, _ in batch):
                seconds = r.model.prefill_step_seconds([(self.cached[rid], length)
                                                        for rid, length in batch])
            else:
                seconds = r.model.prefill_seconds([length for _, length in batch])
        if self.dep.shared_host_slowdown > 1 and r.prefill_only and any(
                d.busy and d.in_decode for d in self.decoders):
            seconds *= self.dep.shared_host_slowdown
        r.busy, r.in_decode, r.last_prefill = True, False, True
        self.prefill_busy += seconds
        self.push(t + seconds, PREFILL_END, r.index, batch)

    def padded_tokens(self, rows: int, longest: int) -> int:
        """Tokens the engine's step of `rows` chunks computes (its bucketed shape)."""
        batches, sizes = self.dep.prefill_batch_buckets, self.dep.prefill_chunk_buckets
        width = next((s for s in sizes if s >= longest), longest)
        return next((b for b in batches if b >= rows), rows) * width

    def padded(self, chunks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The step's chunks as the engine runs them: each as long as the longest's bucket,
        and rows of padding up to the batch's bucket."""
        batches, sizes = self.dep.prefill_batch_buckets, self.dep.prefill_chunk_buckets
        if not chunks or not (batches or sizes):
            return chunks
        longest = max(length for _, length in chunks)
        width = next((s for s in sizes if s >= longest), longest)
        rows = next((b for b in batches if b >= len(chunks)), len(chunks))
        return [(done, width) for done, _ in chunks] + [(0, width)] * (rows - len(chunks))

    def on_prefill_end(self, t: float, index: int, step: list[tuple[int, int]]) -> None:
        r = self.prefillers[index]
        r.in_decode = False  # stays busy while releases run, so they only queue work on it
        batch = []
        for rid, length in step:
            self.computed[rid] += length
            if self.computed[rid] >= self.prompt[rid]:
                batch.append(rid)
                if self.dep.chunk_size:
                    r.queue.remove(rid)
        r.load -= len(batch)
        for rid in batch:
            self.first_token[rid] = t
            if self.output[rid] <= 1:
                self.release(t, rid)
            elif self.colocated:
                r.pending.append(rid)
            else:
                delay = r.model.kv_transfer_seconds(self.prompt[rid] - self.cached[rid])
                self.push(t + delay, KV_ARRIVE, rid, self.home[rid])
        r.busy = False
        self.boundary(t, r)

    # -- decode ------------------------------------------------------------------------------
    def on_kv_arrive(self, t: float, rid: int, index: int) -> None:
        r = self.decoders[index]
        r.pending.append(rid)
        self.wake(t, r)

    def admit(self, r: _Replica) -> None:
        """Pending sequences join the batch (FCFS, up to the batch limit)."""
        while r.pending and r.active < r.max_batch:
            rid = r.pending.popleft()
            heapq.heappush(r.finishes, (r.step + self.output[rid] - 1, rid))
            r.active += 1
            r.context += self.prompt[rid] + 1

    def stretch_seconds(self, r: _Replica, k: int) -> float:
        """k steps at a fixed batch, context growing by the batch each step (trapezoid)."""
        if k == 1:
            return r.seg_f0
        last = r.decode_step(r.seg_batch, r.seg_ctx + r.seg_batch * (k - 1))
        return k * (r.seg_f0 + last) / 2

    def start_decode(self, t: float, r: _Replica, single: bool) -> None:
        """Steps until the next finish (one call when prompts wait on a colocated replica)."""
        k = r.finishes[0][0] - r.step
        if single:
            k = min(k, self.dep.decode_steps_per_dispatch)
        r.seg_t0, r.seg_k, r.seg_batch, r.seg_ctx = t, k, r.active, r.context
        r.seg_f0 = r.decode_step(r.active, r.context)
        r.busy, r.in_decode, r.last_prefill = True, True, False
        r.version += 1
        self.push(t + self.stretch_seconds(r, k), DECODE_END, r.index, r.version)

    def cut(self, t: float, r: _Replica) -> None:
        """End the stretch at the first call boundary at or after t."""
        if r.seg_k == 1:
            return
        lo = self.steps_before(t, r)
        if lo < r.seg_k:
            r.seg_k = lo
            r.version += 1
            self.push(r.seg_t0 + self.stretch_seconds(r, lo), DECODE_END, r.index, r.version)

    def on_decode_end(self, t: float, index: int, version: int) -> None:
        r = self.decoders[index]
        if version != r.version:
            return  # this stretch was cut short
        r.in_decode = False  # stays busy while releases run, so they only queue work on it
        r.step += r.seg_k
        r.context += r.seg_batch * r.seg_k
        while r.finishes and r.finishes[0][0] <= r.step:
            _, rid = heapq.heappop(r.finishes)
            r.active -= 1
            r.context -= self.prompt[rid] + self.output[rid]
            self.release(t, rid)
        r.busy = False
        self.boundary(t, r)

    # -- what an idle replica does next ------------------------------------------------------
    def boundary(self, t: float, r: _Replica) -> None:
        if r.busy:
            return
        if r.prefill_only:
            if r.queue:
                self.start_prefill(t, r)
            return
        self.admit(r)
        if r.queue and (r.active == 0 or not r.last_prefill):
            self.start_prefill(t, r)
        elif r.active:
            self.start_decode(t, r, single=bool(r.queue))


def simulate(deployment: SimDeployment, requests: Sequence[SimRequest]) -> SimResult:
    """Run `requests` through `deployment` until every request has finished (or was dropped)."""
    sim = _Simulation(deployment, requests)
    sim.run()
    return SimResult(tuple(requests), np.array(sim.prefill_start, dtype=float),
                     np.array(sim.first_token, dtype=float), np.array(sim.finish, dtype=float),
                     np.array(sim.placed, dtype=float), sim.rejected, sim.prefill_busy,
                     np.array(sim.home, dtype=int))


DeploymentLike = SimDeployment | Callable[[float], SimDeployment]


def goodput(deployment: DeploymentLike, workload: Callable[[float], Sequence[SimRequest]],
            ttft_slo: float, tpot_slo: float, target: float = 0.9, *, start_rate: float = 1.0,
            rel_tol: float = 0.01, max_doublings: int = 40,
            meets: Callable[[SimResult], bool] | None = None) -> float:
    """The highest request rate (requests/s) whose SLO attainment is >= `target`: DistServe's
    goodput (divide by the device count for goodput per device).

    `deployment` is a SimDeployment or a function of the rate that builds one; `workload(rate)`
    gives the requests (seed it: with `workload.generate` a fixed seed scales the same arrivals
    by 1/rate, so attainment falls monotonically with the rate and bisection is sound).
    Search: from `start_rate`, double (or halve) until the target is bracketed, at most
    `max_doublings` times either way (so within start_rate * 2**+-40); then bisect until the
    bracket is within `rel_tol` (1%) of its lower end. Returns the bracket's lower end (a rate
    that meets the target), 0.0 if even start_rate / 2**40 misses it, and the highest rate tried
    if none missed it. `meets(result)` judges one rate's simulation (default: overall
    attainment >= `target`; the placer passes its steady-state test).
    """
    judge = meets or (lambda res: res.attainment(ttft_slo, tpot_slo) >= target)

    def ok_at(rate: float) -> bool:
        dep = deployment if isinstance(deployment, SimDeployment) else deployment(rate)
        return judge(simulate(dep, workload(rate)))

    lo = hi = start_rate
    if ok_at(start_rate):
        for _ in range(max_doublings):
            hi = lo * 2
            if not ok_at(hi):
                break
            lo = hi
        else:
            return lo
    else:
        for _ in range(max_doublings):
            lo = hi / 2
            if ok_at(lo):
                break
            hi = lo
        else:
            return 0.0
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok_at(mid) else (lo, mid)
    return lo
