"""Steady-state verification (jaxpd/placement/steady.py): a queue that grows slowly passes a
short simulation and fails the steady-state check; the role that binds is read from where the
missing requests waited."""

from __future__ import annotations

from jaxpd.placement.simulator import SimDeployment, simulate
from jaxpd.placement.steady import horizon, longest_lifetime, measure, steady_state
from jaxpd.placement.workload import generate


class _Fixed:
    """Step times that do not depend on the batch: capacity is easy to compute."""

    def __init__(self, prefill_s: float, step_s: float):
        self.prefill_s, self.step_s = prefill_s, step_s

    def prefill_seconds(self, prompt_lengths):
        return self.prefill_s * len(prompt_lengths)

    def decode_step_seconds(self, batch, context_tokens):
        return self.step_s

    def kv_transfer_seconds(self, prompt_tokens):
        return 0.0


def _fixed(rate, count, seed):
    return generate("fixed", rate, count, seed=seed, isl=64, osl=50)


def test_a_slowly_growing_decode_queue_passes_a_short_run_and_fails_the_steady_state():
    """8 sequences per batch x 49 steps of 10 ms: one decode replica carries 16.3 req/s; at
    17 req/s the backlog grows by 0.7 req/s. Its first 400 requests still look fine."""
    dep = SimDeployment.disaggregated(_Fixed(0.001, 0.01), _Fixed(0.001, 0.01),
                                      max_decode_batch=8)
    ttft, tpot = 1.0, 0.05
    short = measure(simulate(dep, _fixed(17.0, 400, 3)), ttft, tpot, 90)
    assert short.attainment >= 0.9
    steady = steady_state(dep, _fixed, 17.0, ttft, tpot, 90, seed=3, maximum=16_000)
    assert steady.requests >= 10 * 17.0 * longest_lifetime(_fixed(1, 10, 0), ttft, tpot)
    assert not steady.meets(ttft, tpot, 0.9)
    assert steady.batches[-1] < steady.batches[0]  # it drifts: the queue keeps growing
    assert steady.binding_role(ttft, tpot) == "decode"
    # with room (a second replica's worth of batch) the same rate holds in the steady state
    roomy = SimDeployment.disaggregated(_Fixed(0.001, 0.01), _Fixed(0.001, 0.01),
                                        max_decode_batch=16)
    assert steady_state(roomy, _fixed, 17.0, ttft, tpot, 90, seed=3,
                        maximum=16_000).meets(ttft, tpot, 0.9)


def test_a_prefill_queue_is_blamed_on_prefill():
    """Prefill of 70 ms per prompt at 15 req/s (utilisation 1.05): TTFT misses, requests wait
    in the prefill queue, decode has room: prefill binds."""
    dep = SimDeployment.disaggregated(_Fixed(0.07, 0.001), _Fixed(0.07, 0.001),
                                      max_decode_batch=256)
    state = steady_state(dep, _fixed, 15.0, 0.5, 0.05, 90, seed=1, maximum=8000)
    assert not state.meets(0.5, 0.05, 0.9)
    assert state.prefill_wait_s > state.kv_wait_s
    assert state.binding_role(0.5, 0.05) == "prefill"


def test_the_horizon_spans_ten_lifetimes_within_its_bounds():
    assert horizon(10.0, 60.0) == 6000
    assert horizon(100.0, 60.0) == 60_000
    assert horizon(1000.0, 60.0) == 64_000
    assert horizon(0.1, 1.0) == 2000
