"""Which pools serve prefill and decode, at what TP, with how many replicas, at the lowest cost.

Two steps:
1. `options`: for every pool and TP degree, what one replica sustains in each role while meeting
   the SLOs, from the cost model and queueing bounds: a prefill replica is an M/D/1 queue whose
   wait plus service must fit the TTFT SLO; a decode replica runs the largest batch whose step
   fits the TPOT SLO and whose KV fits in memory (Little's law turns that batch into requests/s);
   a colocated replica shares its time between the two.
2. `solve`: a mixed-integer program (HiGHS through `scipy.optimize.milp`) picks one prefill and
   one decode option (or one colocated option) and replica counts that carry the request rate
   within every pool's device count, at the lowest $/hour. `solve_exhaustive` enumerates the
   same space and is the test oracle.
The simulator then checks the chosen plan against the whole length distribution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import numpy as np

from jaxpd.model.config import ModelConfig
from jaxpd.placement.cost_model import Efficiency, PhaseModel, Roofline

Role = Literal["prefill", "decode", "colocated"]
TAIL = 2.3  # p90 of an exponential wait is 2.3x its mean: the margin the bounds keep for tails
TP_DEGREES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """What the placer needs of an inventory pool."""

    name: str
    device: str  # catalog key
    vendor: str
    count: int
    price_per_device_hour: float
    roof: Roofline
    max_tp: int  # devices one TP group may span (a node, a slice)


@dataclasses.dataclass(frozen=True)
class Demand:
    rate: float  # requests/s
    isl_mean: float
    isl_p90: float
    osl_mean: float
    ttft_slo: float  # seconds, at p90
    tpot_slo: float  # seconds, at p90


@dataclasses.dataclass(frozen=True)
class Option:
    """One replica of `role` on `tp` devices of `pool`, and what it sustains within the SLOs."""

    role: Role
    pool: str
    tp: int
    capacity: float  # requests/s one replica carries within the SLOs
    price_per_hour: float  # one replica
    note: str  # what bounds it


@dataclasses.dataclass(frozen=True)
class Plan:
    choices: tuple[tuple[Option, int], ...]  # (option, replicas): prefill + decode, or colocated

    @property
    def cost_per_hour(self) -> float:
        return sum(o.price_per_hour * n for o, n in self.choices)

    @property
    def colocated(self) -> bool:
        return self.choices[0][0].role == "colocated"

    def role(self, role: Role) -> tuple[Option, int] | None:
        return next(((o, n) for o, n in self.choices if o.role == role), None)


def _tp_degrees(model: ModelConfig, pool: PoolSpec) -> list[int]:
    return [tp for tp in TP_DEGREES if tp <= min(pool.max_tp, pool.count)
            and model.num_heads % tp == 0]


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
    context = demand.isl_mean + demand.osl_mean / 2
    kv_batch = int(m.kv_capacity_tokens() // (demand.isl_mean + demand.osl_mean))
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
            efficiency: Efficiency = Efficiency(), max_decode_batch: int = 256) -> list[Option]:
    """Every feasible (role, pool, TP) option with its per-replica capacity."""
    out: list[Option] = []
    for pool in pools:
        for tp in _tp_degrees(model, pool):
            m = PhaseModel(model, pool.roof, tp, efficiency)
            if not m.fits(int(demand.isl_p90 + demand.osl_mean)):
                continue
            price = tp * pool.price_per_device_hour
            service = m.prefill_seconds([int(demand.isl_mean)])
            service_p90 = m.prefill_seconds([int(demand.isl_p90)])
            cap, why = _md1_capacity(service, service_p90, demand.ttft_slo)
            if cap > 0:
                out.append(Option("prefill", pool.name, tp, cap, price, why))
            cap, _, why = _decode_capacity(m, demand, max_decode_batch)
            if cap > 0:
                out.append(Option("decode", pool.name, tp, cap, price, why))
            colocated = _colocated_capacity(m, demand, service, service_p90, max_decode_batch)
            if colocated is not None:
                out.append(Option("colocated", pool.name, tp, colocated[0], price, colocated[1]))
    return out


def _colocated_capacity(m: PhaseModel, demand: Demand, service: float, service_p90: float,
                        max_batch: int) -> tuple[float, str] | None:
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
        step = m.decode_step_seconds(batch, int(batch * (demand.isl_mean + demand.osl_mean / 2)))
        wait = TAIL * busy * service / (2 * (1 - busy)) + step
        return service_p90 + wait <= demand.ttft_slo

    lo, hi = 0.0, 1.0 / service
    if not meets(hi * 1e-3):
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo, f"prefill takes {lo * service:.0%} of the replica's time"


# -- choosing replica counts ------------------------------------------------------------------------
def _replicas(option: Option, rate: float) -> int:
    return max(1, math.ceil(rate / option.capacity - 1e-9))


def _fits(plan: Plan, pools: dict[str, PoolSpec]) -> bool:
    used: dict[str, int] = {}
    for o, n in plan.choices:
        used[o.pool] = used.get(o.pool, 0) + o.tp * n
    return all(used[p] <= pools[p].count for p in used)


def solve_exhaustive(opts: Sequence[Option], pools: Sequence[PoolSpec], rate: float) -> Plan | None:
    """Every prefill x decode pair and every colocated option at its fewest replicas: the oracle."""
    by_name = {p.name: p for p in pools}
    plans = [Plan(((o, _replicas(o, rate)),)) for o in opts if o.role == "colocated"]
    plans += [Plan(((p, _replicas(p, rate)), (d, _replicas(d, rate))))
              for p in opts if p.role == "prefill" for d in opts if d.role == "decode"]
    feasible = [plan for plan in plans if _fits(plan, by_name)]
    return min(feasible, key=lambda plan: (plan.cost_per_hour, _devices(plan)), default=None)


def _devices(plan: Plan) -> int:
    return sum(o.tp * n for o, n in plan.choices)


def solve(opts: Sequence[Option], pools: Sequence[PoolSpec], rate: float) -> Plan | None:
    """The cheapest plan, as a mixed-integer program solved by HiGHS.

    Per option i: a binary `pick_i` and an integer `n_i` (replicas), `n_i <= M pick_i`.
    Exactly one prefill and one decode option are picked, or one colocated option; the picked
    options carry `rate`; each pool's devices suffice. Minimise the price of all replicas
    (ties broken toward fewer devices).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    opts = list(opts)
    if not opts:
        return None
    k = len(opts)
    big = np.array([max(_replicas(o, rate), 1) for o in opts], float)  # never more than needed
    role = lambda r: np.array([o.role == r for o in opts], float)  # noqa: E731
    pre, dec, col = role("prefill"), role("decode"), role("colocated")
    zeros = np.zeros(k)
    rows, lo, hi = [], [], []

    def add(pick, n, low, high):
        rows.append(np.concatenate([pick, n]))
        lo.append(low)
        hi.append(high)

    add(pre + col, zeros, 1, 1)  # one prefill option, or a colocated one
    add(dec + col, zeros, 1, 1)  # one decode option, or a colocated one
    cap = np.array([o.capacity for o in opts])
    add(rate * col, cap * pre, rate, np.inf)  # prefill capacity (or colocated)
    add(rate * col, cap * dec, rate, np.inf)
    add(-rate * col, cap * col, 0, np.inf)  # a colocated pick carries the rate itself
    for i in range(k):  # n_i <= big_i * pick_i
        e = np.zeros(k)
        e[i] = 1
        add(-big[i] * e, e, -np.inf, 0)
    for pool in pools:
        devices = np.array([o.tp if o.pool == pool.name else 0 for o in opts], float)
        add(zeros, devices, -np.inf, pool.count)
    price = np.array([o.price_per_hour for o in opts])
    devices = np.array([o.tp for o in opts], float)
    tiebreak = 1e-6 * price.max() / max(devices.max() * big.max(), 1)
    cost = np.concatenate([zeros, price + tiebreak * devices])
    res = milp(cost, constraints=LinearConstraint(np.array(rows), lo, hi),
               integrality=np.ones(2 * k), bounds=Bounds(0, np.concatenate([np.ones(k), big])),
               options={"mip_rel_gap": 0.0})
    if not res.success:
        return None
    n = np.round(res.x[k:]).astype(int)
    chosen = [(o, int(c)) for o, c in zip(opts, n) if c > 0]
    order = {"prefill": 0, "colocated": 0, "decode": 1}
    return Plan(tuple(sorted(chosen, key=lambda c: order[c[0].role])))
