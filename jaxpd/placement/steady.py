"""Whether a deployment meets its SLOs in the steady state, not just over its first minutes.

A queue that grows slowly looks healthy over a few request lifetimes: the requests that would
wait longest have not arrived yet. So a plan is simulated over at least `LIFETIMES` lifetimes of
the longest request (its TTFT budget plus its output at the TPOT budget), the first part is
discarded as warm-up (the system starts empty), and the rest is cut into `BATCHES` consecutive
batches by arrival: the batch means give the attainment and a 95% confidence interval (batch
means are close to independent once a batch spans more than a lifetime). A plan meets the SLOs
when the interval's lower end reaches the target and the percentile SLOs hold over the measured
part; the horizon doubles (up to `MAX_REQUESTS`) while the interval is wider than `TOLERANCE`.

It also says where the missing requests waited: for KV room on the decode side (the router's
queue: decode back-pressure) or in a prefill queue, which is what tells the placer which role
binds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from jaxpd.placement.simulator import SimDeployment, SimResult, simulate
from jaxpd.placement.workload import SimRequest

LIFETIMES = 10
BATCHES = 10
WARMUP = 0.1  # share of the requests discarded at the start (at least one lifetime's worth)
TOLERANCE = 0.02  # widest 95% half-interval of the attainment accepted
MIN_REQUESTS = 2000
MAX_REQUESTS = 64_000
_T975 = {9: 2.262, 19: 2.093}  # Student's t, 97.5%, by degrees of freedom


@dataclasses.dataclass(frozen=True)
class SteadyState:
    attainment: float  # mean of the batch attainments after the warm-up
    half_width: float  # 95% confidence half-interval of it
    batches: tuple[float, ...]  # each batch's attainment, in arrival order
    ttft: float  # at the SLO percentile, over the measured (post-warm-up) requests
    tpot: float
    requests: int  # simulated, warm-up included
    measured: int  # after the warm-up
    kv_wait_s: float  # mean wait for decode KV room of the requests that missed an SLO
    prefill_wait_s: float  # mean wait in a prefill queue of the requests that missed one
    dropped: int

    @property
    def lower(self) -> float:
        return self.attainment - self.half_width

    def meets(self, ttft_slo: float, tpot_slo: float, target: float) -> bool:
        return self.lower >= target and self.ttft <= ttft_slo and self.tpot <= tpot_slo

    def binding_role(self, ttft_slo: float, tpot_slo: float) -> str:
        """The role to grow: decode when TPOT misses or the missed requests waited mostly for
        KV room (decode's back-pressure shows up as TTFT), else prefill."""
        if self.tpot / tpot_slo >= self.ttft / ttft_slo or self.kv_wait_s > self.prefill_wait_s:
            return "decode"
        return "prefill"


def longest_lifetime(requests: Sequence[SimRequest], ttft_slo: float, tpot_slo: float) -> float:
    """Seconds the longest request of a sample lives when it meets its SLOs exactly."""
    longest = max((r.output_tokens for r in requests), default=1)
    return ttft_slo + max(longest - 1, 0) * tpot_slo


def horizon(rate: float, lifetime: float, *, lifetimes: int = LIFETIMES,
            minimum: int = MIN_REQUESTS, maximum: int = MAX_REQUESTS) -> int:
    """Requests that span `lifetimes` lifetimes at `rate` (within [minimum, maximum])."""
    return int(min(maximum, max(minimum, math.ceil(lifetimes * lifetime * rate))))


def measure(result: SimResult, ttft_slo: float, tpot_slo: float, percentile: float, *,
            lifetime: float = 0.0, batches: int = BATCHES, warmup: float = WARMUP) -> SteadyState:
    """Batch-means attainment of one simulation (see the module docstring)."""
    n = len(result.requests)
    arrival = result.arrival_s
    skip = int(warmup * n)
    if lifetime > 0 and n:  # at least one lifetime of arrivals, at most a third of them
        skip = max(skip, int(np.searchsorted(arrival, arrival[0] + lifetime)))
        skip = min(skip, n // 3)
    ttft, tpot = result.ttft_s[skip:], result.tpot_s[skip:]
    ok = (ttft <= ttft_slo) & (tpot <= tpot_slo)
    groups = np.array_split(ok, batches) if ok.size >= batches else [ok]
    means = np.array([g.mean() for g in groups if g.size])
    mean = float(means.mean()) if means.size else 1.0
    if means.size > 1:
        t = _T975.get(means.size - 1, 2.0)
        half = float(t * means.std(ddof=1) / math.sqrt(means.size))
    else:
        half = 0.0
    missed = ~ok
    placed = result.placed_s[skip:] if result.placed_s is not None else None
    arrival, start = arrival[skip:], result.prefill_start_s[skip:]
    with np.errstate(invalid="ignore"):
        kv_wait = placed - arrival if placed is not None else np.zeros_like(arrival)
        prefill_wait = start - placed if placed is not None else start - arrival
    kv_wait = np.where(np.isfinite(kv_wait), kv_wait, 0.0)
    prefill_wait = np.where(np.isfinite(prefill_wait), prefill_wait, 0.0)

    def pct(values: np.ndarray) -> float:
        if values.size == 0:
            return 0.0
        return float(np.percentile(values, percentile)) if np.isfinite(values).all() else \
            float(np.sort(values)[min(values.size - 1, int(percentile / 100 * values.size))])

    return SteadyState(
        attainment=mean, half_width=half, batches=tuple(float(m) for m in means),
        ttft=pct(ttft), tpot=pct(tpot), requests=n, measured=int(ok.size),
        kv_wait_s=float(kv_wait[missed].mean()) if missed.any() else 0.0,
        prefill_wait_s=float(prefill_wait[missed].mean()) if missed.any() else 0.0,
        dropped=result.dropped)


def steady_state(deployment: SimDeployment,
                 workload: Callable[[float, int, int], Sequence[SimRequest]], rate: float,
                 ttft_slo: float, tpot_slo: float, percentile: float, *, seed: int = 0,
                 lifetimes: int = LIFETIMES, minimum: int = MIN_REQUESTS,
                 maximum: int = MAX_REQUESTS, tolerance: float = TOLERANCE) -> SteadyState:
    """Simulate `workload(rate, count, seed)` on `deployment` for `lifetimes` lifetimes of its
    longest request, doubling the horizon (up to `maximum`) while the attainment's interval
    is wider than `tolerance`."""
    sample = workload(rate, minimum, seed)
    lifetime = longest_lifetime(sample, ttft_slo, tpot_slo)
    count = horizon(rate, lifetime, lifetimes=lifetimes, minimum=minimum, maximum=maximum)
    while True:
        requests = workload(rate, count, seed)
        state = measure(simulate(deployment, requests), ttft_slo, tpot_slo, percentile,
                        lifetime=lifetime)
        if state.half_width <= tolerance or count >= maximum:
            return state
        count = min(maximum, count * 2)
