"""From an inventory, a model, a workload and SLOs to a plan checked in the simulator.

The analytic step (`placer.options` + the MILP) is fast but sees only the workload's moments
and queueing bounds. Each leading plan is therefore replayed in the discrete-event simulator
against the whole length distribution and the arrival process, in the steady state (`steady`:
at least ten lifetimes of the longest request, warm-up discarded, batch means with a confidence
interval); a plan that misses an SLO there gains a replica of the role that binds, found from
where the missing requests waited (decode KV room, a prefill queue) and whether TPOT or TTFT
missed, and is replayed again. The cheapest plan the simulator confirms wins; its goodput is
found the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from jaxpd.config import SchedulerSection
from jaxpd.engine.buckets import DEFAULT_PREFILL_BATCH, MIN_CHUNK, pow2_sizes
from jaxpd.model.config import ModelConfig
from jaxpd.placement.cost_model import PhaseModel
from jaxpd.placement.deploy_yaml import plan_scheduler, plan_transport
from jaxpd.placement.placer import (MAX_PER_ROLE, REQUEST_PATH_S, Demand, Objective, Option,
                                    Plan, PoolSpec,
                                    fits,
                                    incompatible_pairs,
                                    kv_link, kv_seconds, max_rate, options, ranked, solve,
                                    tp_degrees)
from jaxpd.placement.simulator import SimDeployment, SimGroup, goodput, simulate
from jaxpd.placement.steady import SteadyState, horizon, longest_lifetime, measure
from jaxpd.placement.workload import SimRequest, generate, load_trace

MAX_PREFILL_TOKENS = 2048  # the scheduler's default prefill step budget (config.py)
MAX_GROWTH = 8  # replicas the simulator check may add to one plan


@dataclasses.dataclass(frozen=True)
class Slo:
    """TTFT and TPOT bounds (seconds) at a percentile, and the share of requests that must meet
    both (DistServe's attainment; defaults to the percentile)."""

    ttft: float
    tpot: float
    percentile: float = 90.0
    attainment: float | None = None

    @property
    def target(self) -> float:
        return self.percentile / 100 if self.attainment is None else self.attainment


@dataclasses.dataclass(frozen=True)
class Workload:
    """A named length distribution ('chatbot', 'code', 'summarization'), fixed lengths
    ('fixed' with isl and osl), or a trace file whose arrivals are rescaled to the rate."""

    kind: str
    isl: int | None = None
    osl: int | None = None
    trace: tuple[SimRequest, ...] = ()

    @classmethod
    def from_trace(cls, path: str) -> Workload:
        return cls("trace", trace=tuple(load_trace(path)))

    def requests(self, rate: float, count: int, seed: int = 0) -> list[SimRequest]:
        if self.kind != "trace":
            return generate(self.kind, rate, count, seed=seed, isl=self.isl, osl=self.osl)
        trace = self.trace
        span = trace[-1].arrival_s - trace[0].arrival_s
        scale = (len(trace) - 1) / (rate * span) if span > 0 and len(trace) > 1 else 1.0
        out, offset = [], 0.0
        while len(out) < count:  # loop the trace to the count, keeping its shape
            for r in trace:
                out.append(SimRequest(offset + (r.arrival_s - trace[0].arrival_s) * scale,
                                      r.prompt_tokens, r.output_tokens, r.cached_tokens))
            offset = out[-1].arrival_s + 1 / rate
        return out[:count]

    def demand(self, rate: float, slo: Slo, samples: int = 20_000,
               max_utilization: float = 1.0) -> Demand:
        """The moments the analytic step sizes with. A decode batch holds long requests
        longer, so its context and its KV reservations are weighted by residence (output
        length), not averaged over requests."""
        reqs = self.requests(1.0, samples, seed=12345)
        isl = np.array([r.prompt_tokens for r in reqs], float)
        osl = np.array([r.output_tokens for r in reqs], float)
        return Demand(rate=rate, isl_mean=float(isl.mean()),
                      isl_p90=float(np.percentile(isl, slo.percentile)),
                      osl_mean=float(osl.mean()), ttft_slo=slo.ttft, tpot_slo=slo.tpot,
                      context_tw=float((osl * (isl + osl / 2)).sum() / osl.sum()),
                      reserved_tw=float((osl * (isl + osl)).sum() / osl.sum()),
                      max_utilization=max_utilization)

    def lifetime(self, slo: Slo, samples: int = 20_000) -> float:
        """Seconds the longest request lives when it meets the SLOs exactly."""
        return longest_lifetime(self.requests(1.0, samples, seed=12345), slo.ttft, slo.tpot)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A plan, its KV hand-off, and what the simulator measured of it."""

    plan: Plan
    transport: str | None  # serving.transport of the hand-off ("shm", "tcp"); None colocated
    kv_link_bytes_s: float
    ttft: float  # at the SLO percentile
    tpot: float
    attainment: float
    verified: bool
    analytic_cost: float  # $/hour the MILP chose before the simulator check
    notes: tuple[str, ...] = ()

    @property
    def cost_per_hour(self) -> float:
        return self.plan.cost_per_hour


@dataclasses.dataclass(frozen=True)
class Placement:
    demand: Demand
    slo: Slo
    candidates: tuple[Candidate, ...]  # ranked, verified first
    single_kind: dict[str, float]  # device kind -> $/hour of its best verified plan alone
    goodput: float = math.nan  # requests/s the best plan sustains within the SLOs (simulated)
    unreachable: str | None = None  # why no plan meets the SLOs

    @property
    def best(self) -> Candidate | None:
        first = self.candidates[0] if self.candidates else None
        return first if first is not None and first.verified else None


class _PhaseLatency:
    """The simulator's LatencyModel over the cost model of one role's replicas."""

    def __init__(self, model: ModelConfig, option: Option, pool: PoolSpec,
                 kv: tuple[Option, dict[str, PoolSpec], str | None] | None = None) -> None:
        self.phase = PhaseModel(model, pool.roof, option.tp, pool.efficiency)
        self.model, self.option, self.kv = model, option, kv
        self._kv_cache: dict[int, float] = {}

    def prefill_seconds(self, prompt_lengths: Sequence[int]) -> float:
        return self.phase.prefill_seconds(prompt_lengths)

    def prefill_step_seconds(self, chunks: Sequence[tuple[int, int]]) -> float:
        return self.phase.prefill_step_seconds(chunks)

    def decode_step_seconds(self, batch: int, context_tokens: int) -> float:
        return self.phase.decode_step_seconds(batch, context_tokens)

    def kv_transfer_seconds(self, prompt_tokens: int) -> float:
        if self.kv is None:
            return 0.0
        seconds = self._kv_cache.get(prompt_tokens)
        if seconds is None:
            decode, pools, transport = self.kv
            seconds = kv_seconds(self.model, self.option, decode, pools, prompt_tokens, transport)
            self._kv_cache[prompt_tokens] = seconds
        return seconds


def engine_buckets(scheduler: SchedulerSection = SchedulerSection()) -> dict:
    """The step shapes a scheduler config compiles, which the engine pads every step up to
    (the engine's defaults when unset), as SimDeployment fields."""
    batches = scheduler.prefill_batch_sizes or pow2_sizes(DEFAULT_PREFILL_BATCH)
    return dict(prefill_batch_buckets=tuple(batches), max_prefill_seqs=batches[-1],
                prefill_chunk_buckets=tuple(scheduler.prefill_chunk_sizes
                                            or pow2_sizes(scheduler.chunk_size, MIN_CHUNK)),
                decode_batch_buckets=tuple(scheduler.decode_batch_sizes
                                           or pow2_sizes(scheduler.max_decode_batch)))


def _engine_shapes(plan: Plan) -> dict:
    """The chunked prefill, step buckets and decode calls of the scheduler section the plan's
    YAML writes (`deploy_yaml.plan_scheduler`), as SimDeployment fields."""
    scheduler = SchedulerSection(**plan_scheduler(plan))
    buckets = engine_buckets(scheduler)
    return dict(chunk_size=scheduler.chunk_size, **buckets,
                decode_steps_per_dispatch=scheduler.decode_steps_per_dispatch)


def sim_deployment(model: ModelConfig, plan: Plan, pools: dict[str, PoolSpec],
                   transport: str | None = None) -> SimDeployment:
    """The simulator's view of a plan: replica counts, latencies, batch and KV limits; the KV
    hand-off priced at `transport` (default: the one the placer writes, `plan_transport`). A
    role on several options becomes several groups, weighted by each option's capacity as
    the YAML's `weight` is; a prefill option's hand-off is priced to its slowest decode
    option (the router may send its requests to any)."""
    def holder(option: Option, replicas: int, weight: float, latency: _PhaseLatency) -> SimGroup:
        return SimGroup(latency, replicas, max(option.kv_tokens, 1), max(option.batch, 1),
                        weight)

    def weight(options: list) -> list[float]:
        return [o.capacity for o, _ in options] if len(options) > 1 else [1.0] * len(options)

    kv_side = plan.kv_holders
    decodes = [holder(o, n, w, _PhaseLatency(model, o, pools[o.pool]))
               for (o, n), w in zip(kv_side, weight(kv_side))]
    if plan.colocated:
        first = decodes[0]
        return SimDeployment.colocated(
            first.model, first.replicas, max_prefill_tokens=MAX_PREFILL_TOKENS,
            max_decode_batch=first.max_decode_batch, kv_capacity_tokens=first.kv_capacity_tokens,
            request_path_s=REQUEST_PATH_S, decode_weight=first.weight,
            decode_groups=tuple(decodes[1:]), **_engine_shapes(plan))
    transport = transport or plan_transport(plan, pools)
    prefill_side = plan.roles("prefill")
    prefills = []
    for (o, n), w in zip(prefill_side, weight(prefill_side)):
        slowest = min((d for d, _ in kv_side),
                      key=lambda d: kv_link(o, d, pools, transport)[0])
        prefills.append(SimGroup(_PhaseLatency(model, o, pools[o.pool], (slowest, pools,
                                                                         transport)), n, weight=w))
    first_p, first_d = prefills[0], decodes[0]
    return SimDeployment.disaggregated(
        first_p.model, first_d.model, prefill_replicas=first_p.replicas,
        decode_replicas=first_d.replicas, max_prefill_tokens=MAX_PREFILL_TOKENS,
        max_decode_batch=first_d.max_decode_batch, kv_capacity_tokens=first_d.kv_capacity_tokens,
        request_path_s=REQUEST_PATH_S, prefill_weight=first_p.weight,
        decode_weight=first_d.weight, prefill_groups=tuple(prefills[1:]),
        decode_groups=tuple(decodes[1:]), **_engine_shapes(plan))


def _grow(plan: Plan, role: str, pools: dict[str, PoolSpec],
          budget: float | None) -> Plan | None:
    """One replica more of `role` (colocated: of the plan's role), on its option with the
    most capacity per dollar that the pools and the budget still allow; None when none."""
    role = "colocated" if plan.colocated else role
    chosen = sorted((o for o, _ in plan.roles(role)), key=lambda o: o.price_per_hour / o.capacity)
    for option in chosen:
        bigger = Plan(tuple((o, n + (o is option)) for o, n in plan.choices))
        if fits(bigger, pools) and (budget is None or bigger.cost_per_hour <= budget):
            return bigger
    return None


def _shrink(plan: Plan, role: str, rate: float) -> Plan | None:
    """One replica of `role` fewer (on its option with the least throughput per dollar),
    unless that leaves the role under its throughput ceiling."""
    chosen = plan.roles(role)
    for option, n in sorted(chosen, key=lambda c: c[0].throughput / c[0].price_per_hour):
        ceiling = sum(o.throughput * (m - (o is option)) for o, m in chosen)
        if n > 1 and ceiling >= rate:
            return Plan(tuple((o, m - (o is option)) for o, m in plan.choices))
    return None


@dataclasses.dataclass(frozen=True)
class _Run:
    state: SteadyState
    ok: bool
    prefill_busy: float  # the share of the prefill replicas' time spent in steps

    def over(self, limit: float) -> str | None:
        """"prefill" when the prefill replicas are busier than `limit`. Only prefill: it is a
        queue whose busy share is its load, while a decode replica steps whenever one request
        runs, so its headroom is its batch and KV (what the analytic sizing loads to the
        limit), not its busy time."""
        return "prefill" if self.prefill_busy > limit else None

    @property
    def ttft(self) -> float:
        return self.state.ttft

    @property
    def tpot(self) -> float:
        return self.state.tpot

    @property
    def attainment(self) -> float:
        return self.state.attainment


def _run(model: ModelConfig, plan: Plan, pools: dict[str, PoolSpec], reqs: list[SimRequest],
         slo: Slo, lifetime: float = 0.0) -> _Run:
    res = simulate(sim_deployment(model, plan, pools), reqs)
    state = measure(res, slo.ttft, slo.tpot, slo.percentile, lifetime=lifetime)
    prefill = plan.replicas("prefill")  # 0 when colocated: held to its analytic load only
    busy = res.utilization(res.prefill_busy_s, prefill) if prefill else 0.0
    return _Run(state, state.meets(slo.ttft, slo.tpot, slo.target), busy)


def verify(model: ModelConfig, plan: Plan, pools: dict[str, PoolSpec], reqs: list[SimRequest],
           slo: Slo, budget: float | None = None, lifetime: float = 0.0,
           max_utilization: float = 1.0) -> Candidate:
    """Simulate `plan` in the steady state (`reqs` should span ten lifetimes of the longest
    request, `lifetime`). While it misses an SLO, or its prefill replicas are busier than
    `max_utilization` in the simulation (the engine's chunked, padded steps can cost more
    than the analytic sizing assumed), add a replica of the role that binds; once it meets
    both, drop replicas the queueing bounds over-provisioned while it still does.

    Each decision is screened on the first quarter of `reqs` (a plan that fails there fails
    the whole run too: the backlog only grows) and confirmed on all of them."""
    analytic, notes, original = plan.cost_per_hour, [], plan
    rate = (len(reqs) - 1) / max(reqs[-1].arrival_s - reqs[0].arrival_s, 1e-9) if reqs else 0.0
    if plan.colocated:
        transport, link = None, 0.0
    else:
        transport = plan_transport(plan, pools)
        link = min(kv_link(p, d, pools, transport)[0] for p, _ in plan.roles("prefill")
                   for d, _ in plan.roles("decode"))
    short = reqs[:max(len(reqs) // 4, min(len(reqs), 4000))]

    def check(candidate: Plan) -> _Run:
        quick = _run(model, candidate, pools, short, slo, lifetime)
        if not quick.ok or len(short) == len(reqs):
            return quick
        return _run(model, candidate, pools, reqs, slo, lifetime)

    run = check(plan)
    for _ in range(MAX_GROWTH):
        busiest = run.over(max_utilization)
        if run.ok and busiest is None:
            break
        role = run.state.binding_role(slo.ttft, slo.tpot) if not run.ok else busiest
        bigger = _grow(plan, role, pools, budget)
        if bigger is None:
            break
        if run.ok:
            why = (f"busy {run.prefill_busy:.0%} of the time in simulation, over "
                   f"--max-utilization {max_utilization:.0%}")
        else:
            why = ("requests waited for decode KV room" if run.state.kv_wait_s >
                   run.state.prefill_wait_s and run.ttft > slo.ttft else
                   f"{'TPOT' if role == 'decode' else 'TTFT'} missed")
            why += f" ({run.attainment:.0%} met the SLOs)"
        added = next(o for (o, n), (_, m) in zip(plan.choices, bigger.choices) if m > n)
        where = f" on {added.pool} TP{added.tp}" if len(plan.roles(added.role)) > 1 else ""
        notes.append(f"+1 {role} replica{where}: {why}" if not plan.colocated
                     else f"+1 replica{where}: {why}")
        plan, run = bigger, check(bigger)
    shrinking, confirmed = run.ok, (plan, run)
    while shrinking:  # screened on the short run; the result is confirmed once at the end
        shrinking = False
        for role in ("prefill", "decode", "colocated"):
            smaller = _shrink(plan, role, rate)
            if smaller is None:
                continue
            trial = _run(model, smaller, pools, short, slo, lifetime)
            if trial.ok and trial.over(max_utilization) is None:
                plan, run, shrinking = smaller, trial, True
    if plan is not confirmed[0]:
        run = _run(model, plan, pools, reqs, slo, lifetime)
        if not run.ok or run.over(max_utilization):  # fine for a quarter of the run only
            plan, run = confirmed
    for o, n in plan.choices:
        before = dict((id(x), m) for x, m in original.choices)[id(o)]
        if n < before:
            notes.append(f"-{before - n} {o.role} replica(s): the queueing bound over-provisioned"
                         f" ({n} meet the SLOs in simulation)")
    return Candidate(plan, transport, link, run.ttft, run.tpot, run.attainment, run.ok, analytic,
                     tuple(notes))


def _key(c: Candidate, objective: Objective) -> tuple:
    if objective == "cost":
        return (not c.verified, c.cost_per_hour, c.plan.devices)
    return (not c.verified, -c.plan.capacity / c.cost_per_hour, c.cost_per_hour)


def place(model: ModelConfig, pools: Sequence[PoolSpec], workload: Workload, rate: float,
          slo: Slo, *, objective: Objective = "cost", budget: float | None = None,
          candidates: int = 5, sim_requests: int = 2000, seed: int = 0,
          compare_single_kinds: bool = True, max_utilization: float = 0.8,
          max_sim_requests: int = 64_000, find_goodput: bool = True,
          max_per_role: int = MAX_PER_ROLE) -> Placement:
    """Rank plans analytically (every replica loaded to at most `max_utilization` of what it
    sustains; a role on up to `max_per_role` options at once), verify the leading
    `candidates` in the simulator's steady state (ten lifetimes of the longest request, at
    least `sim_requests`, at most `max_sim_requests`)."""
    by_name = {p.name: p for p in pools}
    demand = workload.demand(rate, slo, max_utilization=max_utilization)
    lifetime = workload.lifetime(slo)

    def steady_requests(r: float) -> list[SimRequest]:
        return workload.requests(r, horizon(r, lifetime, minimum=sim_requests,
                                            maximum=max_sim_requests), seed)

    opts = options(model, pools, demand)
    bad = incompatible_pairs(model, opts, pools, demand)
    plans = ranked(opts, pools, rate, candidates, objective=objective, budget=budget,
                   incompatible=bad, max_per_role=max_per_role)
    reqs = steady_requests(rate)
    checked = sorted((verify(model, p, by_name, reqs, slo, budget, lifetime, max_utilization)
                      for p in plans),
                     key=lambda c: _key(c, objective))
    single: dict[str, float] = {}
    found: list[Candidate] = []  # verified plans of the single-kind searches
    if compare_single_kinds and len({p.device for p in pools}) > 1:
        for device in sorted({p.device for p in pools}):
            kind = [p for p in pools if p.device == device]
            sub = place(model, kind, workload, rate, slo, objective="cost", budget=None,
                        candidates=min(candidates, 3), sim_requests=sim_requests, seed=seed,
                        compare_single_kinds=False, max_utilization=max_utilization,
                        max_sim_requests=max_sim_requests, find_goodput=False,
                        max_per_role=max_per_role)
            costs = [c.cost_per_hour for c in (*sub.candidates, *checked) if c.verified
                     and {by_name[o.pool].device for o, _ in c.plan.choices} == {device}]
            if costs:
                single[device] = min(costs)
            found += [c for c in sub.candidates if c.verified
                      and (budget is None or c.cost_per_hour <= budget)]
    # verification grows plans, so a single-kind search can end cheaper than every mixed plan
    # ranked first: the best of everything verified wins
    seen = {c.plan.describe() for c in checked}
    checked = sorted([*checked, *(c for c in found if c.plan.describe() not in seen)],
                     key=lambda c: _key(c, objective))
    placement = Placement(demand, slo, tuple(checked), single)
    if placement.best is None:
        why = unreachable(model, pools, opts, bad, demand, slo, checked, budget)
        return dataclasses.replace(placement, unreachable=why)
    if not find_goodput:
        return placement
    best = placement.best
    dep = sim_deployment(model, best.plan, by_name)
    rate_goodput = goodput(dep, steady_requests, slo.ttft, slo.tpot, slo.target,
                           start_rate=rate, rel_tol=0.05,
                           meets=lambda res: measure(res, slo.ttft, slo.tpot, slo.percentile,
                                                     lifetime=lifetime).meets(
                               slo.ttft, slo.tpot, slo.target))
    return dataclasses.replace(placement, goodput=rate_goodput)


def unreachable(model: ModelConfig, pools: Sequence[PoolSpec], opts: Sequence[Option],
                bad: set[tuple[int, int]], demand: Demand, slo: Slo,
                checked: Sequence[Candidate], budget: float | None) -> str:
    """One line: which SLO (or the rate, or the budget) is out of reach, and the best figure."""
    p = f"p{slo.percentile:g}"
    fastest_prefill = fastest_step = math.inf
    prefill_at = step_at = ""
    context = int(demand.isl_mean + demand.osl_mean)
    for pool in pools:
        for tp in tp_degrees(model, pool):
            m = PhaseModel(model, pool.roof, tp, pool.efficiency)
            if not m.fits(context):
                continue
            t = m.prefill_seconds([int(demand.isl_p90)])
            if t < fastest_prefill:
                fastest_prefill, prefill_at = t, f"{pool.name} TP{tp}"
            s = m.decode_step_seconds(1, context)
            if s < fastest_step:
                fastest_step, step_at = s, f"{pool.name} TP{tp}"
    if not math.isfinite(fastest_prefill):
        return (f"no pool can hold the model ({model.num_params() / 1e9:.1f}B parameters) with "
                f"KV for one {context}-token request at any TP degree")
    if fastest_prefill + REQUEST_PATH_S > slo.ttft:
        return (f"ttft_{p}={slo.ttft:g}s is out of reach: the fastest prefill of a {p} prompt "
                f"({int(demand.isl_p90)} tokens) takes {fastest_prefill:.3g}s ({prefill_at}), "
                f"plus {REQUEST_PATH_S * 1e3:.3g} ms on the request path (router, gRPC)")
    if fastest_step > slo.tpot:
        return (f"tpot_{p}={slo.tpot:g}s is out of reach: the fastest decode step takes "
                f"{fastest_step:.3g}s even at batch 1 ({step_at})")
    if checked:
        c = checked[0]
        worst = ("ttft", c.ttft, slo.ttft) if c.ttft / slo.ttft >= c.tpot / slo.tpot else \
            ("tpot", c.tpot, slo.tpot)
        return (f"{worst[0]}_{p}={worst[2]:g}s is out of reach at {demand.rate:g} req/s: the best "
                f"plan the inventory allows ({c.plan.describe()}) reaches {worst[1]:.3g}s in "
                f"simulation ({c.attainment:.0%} of requests meet both SLOs)")
    cheapest = solve(opts, pools, demand.rate, incompatible=bad) if budget is not None else None
    if cheapest is not None:
        return (f"budget ${budget:g}/hour is out of reach: the cheapest plan meeting the SLOs at "
                f"{demand.rate:g} req/s costs ${cheapest.cost_per_hour:.2f}/hour")
    most = max_rate(opts, pools, bad)
    if most is None:
        return (f"no plan on this inventory meets ttft_{p}={slo.ttft:g}s and "
                f"tpot_{p}={slo.tpot:g}s together at any rate")
    return (f"rate {demand.rate:g} req/s is out of reach on this inventory: at most "
            f"{most.capacity:.3g} req/s meet ttft_{p}={slo.ttft:g}s and tpot_{p}={slo.tpot:g}s "
            f"({most.describe()}, by the queueing bounds)")


__all__ = ["Slo", "Workload", "Candidate", "Placement", "place", "verify", "sim_deployment",
           "unreachable"]
