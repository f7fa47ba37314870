"""Which pools serve prefill and decode, at what TP, with how many replicas, at the lowest cost.

Two steps:
1. `options`: for every pool and TP degree, what one replica sustains in each role while meeting
   the SLOs, from the cost model and queueing bounds: a prefill replica is an M/D/1 queue whose
   wait plus service must fit the TTFT SLO; a decode replica runs the largest batch whose step
   fits the TPOT SLO and whose KV fits in memory (Little's law turns that batch into requests/s);
   a colocated replica shares its time between the two.
2. `solve`: a mixed-integer program (HiGHS through `scipy.optimize.milp`) picks prefill and
   decode options (or colocated ones), up to `max_per_role` of each (decode on v5e and v6e
   together, when one pool runs out or mixing rounds better), and replica counts per option
   that carry the request rate within every pool's device count, at the lowest $/hour.
   `solve_exhaustive` enumerates the same space and is the test oracle.
The simulator then checks the chosen plan against the whole length distribution.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Literal, Sequence

import numpy as np

from jaxpd.model.config import ModelConfig
from jaxpd.placement.cost_model import Efficiency, PhaseModel, Roofline, kv_transfer_seconds

Role = Literal["prefill", "decode", "colocated"]
TAIL = 2.3  # p90 of an exponential wait is 2.3x its mean: the margin the bounds keep for tails
TP_DEGREES = (1, 2, 4, 8, 16)
KV_SHARE_OF_TPOT = 0.25  # of a request's TPOT budget its KV hand-off may take
# jaxpd's prefill worker sends a request's KV once its prefill ends (jaxpd/transfer); flip this
# when the hand-off streams layer by layer behind the prefill.
KV_LAYERWISE = False


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """What the placer needs of an inventory pool."""

    name: str
    device: str  # catalog key
    vendor: str
    count: int
    price_per_device_hour: float
    roof: Roofline
    max_tp: int  # devices one TP group may span on one host
    network_bandwidth: float = 0.0  # bytes/s per device between hosts (KV across pools)
    efficiency: Efficiency = Efficiency()  # calibrated from a profile of this device, if any
    devices_per_host: int = 8  # of the hosts a multi-host replica spans
    max_slice_tp: int = 0  # widest TP over several hosts on the same link (TPU slices); 0: max_tp
    node_labels: tuple[tuple[str, str], ...] = ()  # Kubernetes node labels of the pool

    def hosts(self, tp: int) -> int:
        """Hosts one replica of `tp` devices spans: 1 up to max_tp, else whole hosts."""
        return 1 if tp <= self.max_tp else tp // self.devices_per_host

    def topology(self, tp: int) -> str | None:
        """The TPU slice shape of `tp` chips (GKE's gke-tpu-topology), None for GPUs or a chip
        count no slice has."""
        return tpu_topology(self.device, tp)


@dataclasses.dataclass(frozen=True)
class Demand:
    rate: float  # requests/s
    isl_mean: float
    isl_p90: float
    osl_mean: float
    ttft_slo: float  # seconds, at p90
    tpot_slo: float  # seconds, at p90
    # a decode batch's mean context and KV reservation per sequence, weighted by residence
    # (long requests stay longer): E[osl * (isl + osl/2)] / E[osl], E[osl * (isl + osl)] / E[osl]
    context_tw: float = 0.0  # 0: isl_mean + osl_mean / 2
    reserved_tw: float = 0.0  # 0: isl_mean + osl_mean
    max_utilization: float = 1.0  # of what a replica sustains, at most (headroom)

    @property
    def batch_context(self) -> float:
        return self.context_tw or self.isl_mean + self.osl_mean / 2

    @property
    def batch_reserved(self) -> float:
        return self.reserved_tw or self.isl_mean + self.osl_mean


@dataclasses.dataclass(frozen=True)
class Option:
    """One replica of `role` on `tp` devices of `pool`, and what it sustains within the SLOs."""

    role: Role
    pool: str
    tp: int
    capacity: float  # requests/s one replica carries within the SLOs
    price_per_hour: float  # one replica
    note: str  # what bounds it
    batch: int = 0  # decode (or colocated): the largest batch whose step fits the TPOT SLO
    kv_tokens: int = 0  # KV tokens one replica holds after its weights
    throughput: float = math.inf  # requests/s one replica can never exceed (decode's Little's
    # law at `batch`): the simulator's short horizon cannot see a slow backlog, this bound can


@dataclasses.dataclass(frozen=True)
class Plan:
    """(option, replicas) pairs: prefill options then decode options, or colocated ones; a
    role with several options runs on several pools (or TP degrees) at once."""

    choices: tuple[tuple[Option, int], ...]

    @property
    def cost_per_hour(self) -> float:
        return sum(o.price_per_hour * n for o, n in self.choices)

    @property
    def colocated(self) -> bool:
        return self.choices[0][0].role == "colocated"

    def roles(self, role: Role) -> list[tuple[Option, int]]:
        """The (option, replicas) of `role`, in plan order."""
        return [(o, n) for o, n in self.choices if o.role == role]

    def replicas(self, role: Role) -> int:
        return sum(n for _, n in self.roles(role))

    @property
    def kv_holders(self) -> list[tuple[Option, int]]:
        """The options holding KV: decode, or colocated."""
        return self.roles("colocated" if self.colocated else "decode")

    @property
    def capacity(self) -> float:
        """Requests/s the plan carries within the SLOs (its slower side)."""
        sides = [["colocated"]] if self.colocated else [["prefill"], ["decode"]]
        return min(sum(o.capacity * n for o, n in self.choices if o.role in side)
                   for side in sides)

    @property
    def devices(self) -> int:
        return sum(o.tp * n for o, n in self.choices)

    def describe(self) -> str:
        return " + ".join(f"{o.role} {n} x {o.pool} TP{o.tp}" for o, n in self.choices)


# TPU slice shapes by chip count (GKE's cloud.google.com/gke-tpu-topology): v5e and v6e are
# 2D, v5p 3D; a chip count without a shape cannot be a replica's slice
_TPU_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"}
_TPU_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"}


def tpu_topology(device: str, chips: int) -> str | None:
    if device in ("tpu-v5e", "tpu-v6e"):
        return _TPU_2D.get(chips)
    if device == "tpu-v5p":
        return _TPU_3D.get(chips)
    return None


def tp_degrees(model: ModelConfig, pool: PoolSpec) -> list[int]:
    """TP degrees one replica may use on `pool`: within a host (max_tp), or over whole hosts of
    one slice (max_slice_tp); dividing the heads; on TPU, chip counts a slice has."""
    widest = max(pool.max_tp, pool.max_slice_tp)
    out = []
    for tp in TP_DEGREES:
        if tp > min(widest, pool.count) or model.num_heads % tp:
            continue
        if tp > pool.max_tp and tp % pool.devices_per_host:
            continue
        if pool.device.startswith("tpu-") and tpu_topology(pool.device, tp) is None:
            continue
        out.append(tp)
    return out


def _md1_capacity(service: float, service_p90: float, ttft_slo: float) -> tuple[float, str]:
    """Highest arrival rate at which service_p90 + TAIL x (M/D/1 mean wait) fits the TTFT SLO."""
    slack = ttft_slo - service_p90
    if slack <= 0:
        return 0.0, f"a p90 prompt's prefill alone takes {service_p90:.3g} s > TTFT SLO"
    a = slack / (TAIL * service)  # rho / (2 (1 - rho)) <= a
    rho = 2 * a / (1 + 2 * a)
    return rho / service, f"prefill {service * 1e3:.3g} ms/prompt, utilisation <= {rho:.2f}"


def _decode_capacity(m: PhaseModel, demand: Demand, max_batch: int,
                     share: float = 1.0) -> tuple[float, int, str]:
    """(requests/s, batch, why) of a decode replica given `share` of its time."""
    context = demand.batch_context
    kv_batch = int(m.kv_capacity_tokens() // demand.batch_reserved)
    best, why = (0.0, 0), "the weights leave no room for KV" if kv_batch < 1 else "one step exceeds the TPOT SLO"
    batch = 1
    while batch <= min(max_batch, kv_batch):
        step = m.decode_step_seconds(batch, int(batch * context)) / share
        if step > demand.tpot_slo:
            break
        best = (batch / (demand.osl_mean * step), batch)
        why = f"batch {batch}: {step * 1e3:.3g} ms/step"
        batch *= 2
    if best[1] and best[1] * 2 > kv_batch:
        why += " (KV memory bound)"
    return best[0], best[1], why


def options(model: ModelConfig, pools: Sequence[PoolSpec], demand: Demand, *,
            max_decode_batch: int = 256) -> list[Option]:
    """Every feasible (role, pool, TP) option with its per-replica capacity."""
    out: list[Option] = []
    for pool in pools:
        for tp in tp_degrees(model, pool):
            m = PhaseModel(model, pool.roof, tp, pool.efficiency)
            if not m.fits(int(demand.isl_p90 + demand.osl_mean)):
                continue
            price = tp * pool.price_per_device_hour
            service = m.prefill_seconds([int(demand.isl_mean)])
            service_p90 = m.prefill_seconds([int(demand.isl_p90)])
            u = demand.max_utilization  # headroom: no replica loaded past u of what it can do
            cap, why = _md1_capacity(service, service_p90, demand.ttft_slo - REQUEST_PATH_S)
            if cap > u / service:
                cap, why = u / service, f"prefill {service * 1e3:.3g} ms/prompt, utilisation <= {u:.2f}"
            if cap > 0:
                out.append(Option("prefill", pool.name, tp, cap, price, why))
            kv = m.kv_capacity_tokens()
            cap, batch, why = _decode_capacity(m, demand, max_decode_batch)
            if cap > 0:
                out.append(Option("decode", pool.name, tp, u * cap, price,
                                  f"{why}; loaded to {u:.0%}", batch, kv, cap))
            colocated = _colocated_capacity(m, demand, service, service_p90, max_decode_batch)
            if colocated is not None:
                capacity, why, batch = colocated
                ceiling = cap / (1 + cap * service)  # decode in the time prefill leaves
                out.append(Option("colocated", pool.name, tp, u * capacity, price,
                                  f"{why}; loaded to {u:.0%}", batch, kv, ceiling))
    return out


def _colocated_capacity(m: PhaseModel, demand: Demand, service: float, service_p90: float,
                        max_batch: int) -> tuple[float, str, int] | None:
    """Largest rate at which one replica doing both phases meets both SLOs (bisection): prompts
    take `rate x service` of its time, decode steps stretch over the rest, and a prompt also
    waits for the decode step in progress."""
    def meets(rate: float) -> bool:
        busy = rate * service
        if busy >= 1:
            return False
        decode_cap, batch, _ = _decode_capacity(m, demand, max_batch, share=1 - busy)
        if decode_cap < rate or batch == 0:
            return False
        step = m.decode_step_seconds(batch, int(batch * demand.batch_context))
        wait = TAIL * busy * service / (2 * (1 - busy)) + step
        return service_p90 + wait + REQUEST_PATH_S <= demand.ttft_slo

    lo, hi = 0.0, 1.0 / service
    if not meets(hi * 1e-3):
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    batch = _decode_capacity(m, demand, max_batch, share=1 - lo * service)[1]
    return lo, f"prefill takes {lo * service:.0%} of the replica's time", batch




# -- the KV hand-off between a prefill and a decode option --------------------------------------
# What jaxpd's KV transports move per request, measured on the development VM (2 cores,
# loopback): `tools/bench_transfer.py --tokens 2048 --message-mib 4 --repeats 3`, 2026-12-03
# (docs/benchmarks.md, Llama-3-8B-shaped KV). The hand-off is priced at the transport the
# written deployment uses (`serving.transport`): shared memory when prefill and decode share a
# host, the tcp data plane between hosts, capped by the hosts' network. Figures measured on
# the serving hosts themselves would replace these.
# What a request's TTFT holds beyond the workers' queue, prefill and hand-off: the router's check
# and tokenization, the gRPC hops and streaming the first token back. Measured through the
# served CPU deployment (p50 of client TTFT - queue_s - prefill_s over 40 requests):
# `tools/bench_serving.py --workload code --rate 2 --requests 40 --warmup 1 --skip-in-process`,
# configs/local.yaml, 2-core VM, 2026-12-03. It runs on the hosts' CPUs whatever the
# accelerator, so the placer carries it on every request.
REQUEST_PATH_S = 0.0053

TRANSPORT_BYTES_PER_S = {"shm": 1.22e9, "tcp": 0.95e9, "grpc": 0.80e9, "jax": 0.61e9}


def kv_link(pre: Option, dec: Option, pools: dict[str, PoolSpec],
            transport: str | None = None) -> tuple[float, str]:
    """(bytes/s, serving.transport) of the hand-off: shm when both groups fit on one host of
    one pool, else tcp, at its measured rate, capped between hosts by the slower end's NICs.
    `transport` (a deployment's serving.transport) prices that one instead; auto is shm on one
    host and tcp between hosts (jax between accelerators is not measured: priced as tcp)."""
    a, b = pools[pre.pool], pools[dec.pool]
    one_host = a.name == b.name and pre.tp + dec.tp <= a.max_tp
    chosen = transport if transport not in (None, "auto") else ("shm" if one_host else "tcp")
    rate = TRANSPORT_BYTES_PER_S[chosen]
    if one_host:
        return rate, chosen
    return min(rate, a.network_bandwidth * pre.tp, b.network_bandwidth * dec.tp), chosen


def kv_seconds(model: ModelConfig, pre: Option, dec: Option, pools: dict[str, PoolSpec],
               prompt_tokens: int, transport: str | None = None) -> float:
    """One prompt's hand-off at its transport's measured rate (an achieved figure: no further
    efficiency), with the overlap of layer-by-layer streaming behind prefill if enabled."""
    pool = pools[pre.pool]
    m = PhaseModel(model, pool.roof, pre.tp, pool.efficiency)
    return kv_transfer_seconds(model, prompt_tokens, kv_link(pre, dec, pools, transport)[0],
                               m.prefill_seconds([prompt_tokens]), 1.0, layerwise=KV_LAYERWISE)


def incompatible_pairs(model: ModelConfig, opts: Sequence[Option], pools: Sequence[PoolSpec],
                       demand: Demand) -> set[tuple[int, int]]:
    """(prefill, decode) option indices whose hand-off of a p90 prompt would take more than a
    quarter of the request's TPOT budget (it counts toward TPOT), or has no link at all."""
    by_name = {p.name: p for p in pools}
    budget = KV_SHARE_OF_TPOT * demand.tpot_slo * max(demand.osl_mean - 1, 1)
    out = set()
    for i, p in enumerate(opts):
        if p.role != "prefill":
            continue
        for j, d in enumerate(opts):
            if d.role == "decode" and not (kv_seconds(model, p, d, by_name, int(demand.isl_p90))
                                           <= budget):
                out.add((i, j))
    return out


# -- choosing replica counts ------------------------------------------------------------------------
Objective = Literal["cost", "goodput-per-dollar"]


def fits(plan: Plan, pools: dict[str, PoolSpec]) -> bool:
    """Every pool has the devices the plan asks of it."""
    used: dict[str, int] = {}
    for o, n in plan.choices:
        used[o.pool] = used.get(o.pool, 0) + o.tp * n
    return all(used[p] <= pools[p].count for p in used)


def _replicas(option: Option, rate: float) -> int:
    return max(1, math.ceil(rate / option.capacity - 1e-9))


def _ordered(choices) -> Plan:
    order = {"prefill": 0, "colocated": 0, "decode": 1}
    return Plan(tuple(sorted(choices, key=lambda c: order[c[0].role])))


MAX_PER_ROLE = 2  # options one role may combine (decode on v5e and v6e together)


def _structures(opts: Sequence[Option], bad: set[tuple[int, int]],
                max_per_role: int = MAX_PER_ROLE) -> list[tuple[int, ...]]:
    """Every set of up to `max_per_role` colocated options, and every set of up to
    `max_per_role` prefill options with up to as many decode options, no pair of them
    incompatible (indices)."""
    def subsets(role: str) -> list[tuple[int, ...]]:
        idx = [i for i, o in enumerate(opts) if o.role == role]
        return [c for k in range(1, max_per_role + 1) for c in itertools.combinations(idx, k)]

    out: list[tuple[int, ...]] = subsets("colocated")
    out += [p + d for p in subsets("prefill") for d in subsets("decode")
            if not any((i, j) in bad for i in p for j in d)]
    return out


def _key(plan: Plan, objective: Objective) -> tuple:
    if objective == "cost":
        return (plan.cost_per_hour, plan.devices)
    return (-plan.capacity / plan.cost_per_hour, plan.cost_per_hour)


def solve_exhaustive(opts: Sequence[Option], pools: Sequence[PoolSpec], rate: float, *,
                     objective: Objective = "cost", budget: float | None = None,
                     incompatible: set[tuple[int, int]] = frozenset(),
                     max_per_role: int = MAX_PER_ROLE) -> Plan | None:
    """Enumerate every structure and replica count: the test oracle for `solve` (small cases:
    the count ranges multiply)."""
    by_name = {p.name: p for p in pools}
    best: Plan | None = None
    for structure in _structures(opts, set(incompatible), max_per_role):
        chosen = [opts[i] for i in structure]
        most = [by_name[o.pool].count // o.tp for o in chosen]
        if objective == "cost":  # an option never needs more than it would need alone
            most = [min(m, _replicas(o, rate)) for m, o in zip(most, chosen)]
        for ns in itertools.product(*(range(1, m + 1) for m in most)):
            plan = _ordered(zip(chosen, ns))
            if (not fits(plan, by_name) or plan.capacity < rate - 1e-9
                    or (budget is not None and plan.cost_per_hour > budget + 1e-9)):
                continue
            if best is None or _key(plan, objective) < _key(best, objective):
                best = plan
    return best


def solve(opts: Sequence[Option], pools: Sequence[PoolSpec], rate: float, *,
          objective: Objective = "cost", budget: float | None = None,
          incompatible: set[tuple[int, int]] = frozenset(),
          exclude: Sequence[frozenset[int]] = (), max_per_role: int = MAX_PER_ROLE) -> Plan | None:
    """The best plan as a mixed-integer program solved by HiGHS.

    Variables per option i: a binary `pick_i` and an integer `n_i` (replicas, `pick_i <= n_i <=
    M pick_i`); the carried rate `r >= rate`; a binary `c` (colocated). With c = 0, one to
    `max_per_role` prefill options and as many decode options are picked, with c = 1 as many
    colocated ones; the prefill-side and decode-side capacity of the picks each carry `r`;
    incompatible (prefill, decode) pairs are never picked together; each pool's devices
    suffice; the $/hour stays within `budget`. `exclude` lists pick sets already found, so the
    caller can ask for the next best (no-good cuts).

    objective "cost": minimise $/hour at `rate` (ties toward fewer devices, then fewer options).
    objective "goodput-per-dollar": maximise r / ($/hour) by Dinkelbach's method: maximise
    r - lambda * cost, set lambda to the ratio found, repeat until it stops rising.
    """
    opts = list(opts)
    if not opts:
        return None
    common = (budget, incompatible, exclude, max_per_role)
    if objective == "cost":
        return _solve_milp(opts, pools, rate, 0.0, *common, minimise_cost=True)
    plan, ratio = None, 0.0
    for _ in range(30):
        found = _solve_milp(opts, pools, rate, ratio, *common, minimise_cost=False)
        if found is None:
            return plan
        new_ratio = found.capacity / found.cost_per_hour
        if plan is not None and new_ratio <= ratio * (1 + 1e-9):
            return plan
        plan, ratio = found, new_ratio
    return plan


def _solve_milp(opts: list[Option], pools: Sequence[PoolSpec], rate: float, ratio: float,
                budget: float | None, incompatible, exclude, max_per_role: int = MAX_PER_ROLE, *,
                minimise_cost: bool) -> Plan | None:
    from scipy.optimize import Bounds, LinearConstraint, milp

    k = len(opts)
    by_name = {p.name: p for p in pools}
    if minimise_cost:  # never more replicas of an option than the rate needs
        big = np.array([_replicas(o, rate) for o in opts], float)
    else:
        big = np.array([max(by_name[o.pool].count // o.tp, 1) for o in opts], float)
    role = lambda r: np.array([o.role == r for o in opts], float)  # noqa: E731
    pre, dec, col = role("prefill"), role("decode"), role("colocated")
    cap = np.array([o.capacity for o in opts])
    price = np.array([o.price_per_hour for o in opts])
    zeros = np.zeros(k)
    rows, lo, hi = [], [], []
    most = float(max_per_role)

    def add(pick, n, r, low, high, c=0.0):  # variables: pick (k), n (k), r, c
        rows.append(np.concatenate([pick, n, [r, c]]))
        lo.append(low)
        hi.append(high)

    for side in (pre, dec):  # c = 0: 1..most options of each role; c = 1: none
        add(side, zeros, 0, 1, np.inf, c=1.0)  # sum >= 1 - c
        add(side, zeros, 0, -np.inf, most, c=most)  # sum <= most (1 - c)
    add(col, zeros, 0, 0, np.inf, c=-1.0)  # c = 1: 1..most colocated options; c = 0: none
    add(col, zeros, 0, -np.inf, 0, c=-most)
    add(zeros, cap * (pre + col), -1, 0, np.inf)  # the prefill side carries r
    add(zeros, cap * (dec + col), -1, 0, np.inf)  # the decode side carries r
    for i in range(k):  # pick_i <= n_i <= big_i * pick_i
        e = np.zeros(k)
        e[i] = 1
        add(-big[i] * e, e, 0, -np.inf, 0)
        add(-e, e, 0, 0, np.inf)
    for pool in pools:
        devices = np.array([o.tp if o.pool == pool.name else 0 for o in opts], float)
        add(zeros, devices, 0, -np.inf, pool.count)
    for i, j in incompatible:
        e = np.zeros(k)
        e[[i, j]] = 1
        add(e, zeros, 0, -np.inf, 1)
    for picks in exclude:
        e = np.zeros(k)
        e[list(picks)] = 1
        add(e, zeros, 0, -np.inf, len(picks) - 1)
    if budget is not None:
        add(zeros, price, 0, -np.inf, budget)
    devices = np.array([o.tp for o in opts], float)
    if minimise_cost:
        tiebreak = 1e-6 * price.min() / max(devices.max() * big.max(), 1)
        cost = np.concatenate([np.full(k, tiebreak * 0.5), price + tiebreak * devices,
                               [0.0, 0.0]])
    else:
        cost = np.concatenate([np.full(k, 1e-9), ratio * price, [-1.0, 0.0]])
    integrality = np.concatenate([np.ones(2 * k), [0, 1]])
    bounds = Bounds(np.concatenate([zeros, zeros, [rate, 0]]),
                    np.concatenate([np.ones(k), big, [np.inf, 1]]))
    res = milp(cost, constraints=LinearConstraint(np.array(rows), lo, hi),
               integrality=integrality, bounds=bounds, options={"mip_rel_gap": 0.0})
    if not res.success:
        return None
    n = np.round(res.x[k:2 * k]).astype(int)
    return _ordered([(o, int(c)) for o, c in zip(opts, n) if c > 0])


def ranked(opts: Sequence[Option], pools: Sequence[PoolSpec], rate: float, count: int, *,
           objective: Objective = "cost", budget: float | None = None,
           incompatible: set[tuple[int, int]] = frozenset(),
           max_per_role: int = MAX_PER_ROLE) -> list[Plan]:
    """The best `count` plans of different structure (pool, role, TP choices), best first
    (a plan's cut also excludes the structures that add options to it)."""
    index = {id(o): i for i, o in enumerate(opts)}
    plans: list[Plan] = []
    exclude: list[frozenset[int]] = []
    while len(plans) < count:
        plan = solve(opts, pools, rate, objective=objective, budget=budget,
                     incompatible=incompatible, exclude=exclude, max_per_role=max_per_role)
        if plan is None:
            break
        plans.append(plan)
        exclude.append(frozenset(index[id(o)] for o, _ in plan.choices))
    return plans


def max_rate(opts: Sequence[Option], pools: Sequence[PoolSpec],
             incompatible: set[tuple[int, int]] = frozenset()) -> Plan | None:
    """The plan carrying the highest rate within the SLOs that the pools allow (analytic)."""
    if not opts:
        return None
    return _solve_milp(list(opts), pools, 0.0, 0.0, None, incompatible, (), MAX_PER_ROLE,
                       minimise_cost=False)
