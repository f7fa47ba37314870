"""The placement simulator and its workload generator: queueing theory (M/D/1), DistServe's
qualitative findings with a toy latency model, exact timings against a per-step reference, and
the workload's seeds, rates, burstiness and trace files."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from jaxpd.placement.simulator import (LatencyModel, SimDeployment, SimGroup, goodput,
                                      simulate)
from jaxpd.placement.workload import (DISTRIBUTIONS, SimRequest, TraceError, dump_trace,
                                      generate, load_trace)


@dataclasses.dataclass(frozen=True)
class Toy:
    """Prefill cost proportional to prompt tokens; decode step a + b * batch (+ c * context)."""

    per_token: float = 2e-4
    a: float = 0.008
    b: float = 1e-4
    c: float = 0.0
    transfer: float = 0.002

    def prefill_seconds(self, prompt_lengths):
        return self.per_token * sum(prompt_lengths)

    def prefill_step_seconds(self, chunks):
        return self.per_token * sum(length for _, length in chunks)

    def decode_step_seconds(self, batch, context_tokens):
        return self.a + self.b * batch + self.c * context_tokens

    def kv_transfer_seconds(self, prompt_tokens):
        return self.transfer


def test_toy_is_a_latency_model():
    assert isinstance(Toy(), LatencyModel)


# -- queueing theory ----------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_prefill_queue_is_md1(rho):
    """One prefill replica, one prompt per batch, constant service D, Poisson arrivals: the mean
    wait before prefill starts is Pollaczek-Khinchine's rho D / (2 (1 - rho)). With 200k
    requests the estimate's spread is about 1% at rho 0.8 (seeds 0-2 land within 1.5%), so 3%
    is a margin of about three standard errors; the seed is fixed, so the test is deterministic."""
    service, isl = 0.05, 100
    model = Toy(per_token=service / isl)
    dep = SimDeployment.disaggregated(model, model, max_prefill_tokens=isl)
    reqs = generate("fixed", rho / service, 200_000, seed=0, isl=isl, osl=1)
    res = simulate(dep, reqs)
    wait = np.mean(res.prefill_start_s - res.arrival_s)
    expected = rho * service / (2 * (1 - rho))
    assert wait == pytest.approx(expected, rel=0.03)
    assert np.allclose(res.ttft_s, res.prefill_start_s - res.arrival_s + service)


# -- DistServe's findings -----------------------------------------------------------------------
TTFT_SLO, TPOT_SLO = 0.4, 0.012  # prefill of 512 tokens takes 0.1 s; a decode step ~ 8-9 ms


def _pair():
    model = Toy()
    return (SimDeployment.disaggregated(model, model, max_prefill_tokens=2048),
            SimDeployment.colocated(model, 2, max_prefill_tokens=2048))  # same 2 devices


def _workload(rate):
    return generate("fixed", rate, 2000, seed=0, isl=512, osl=128)


def test_disaggregation_wins_at_high_load_with_tight_slos():
    """Colocated, each prefill stalls every decoding sequence for 0.1 s, so TPOT breaks the
    tight SLO; one decode replica batches everything at ~9 ms a step."""
    dis, col = _pair()
    reqs = _workload(5.0)
    dis_res, col_res = simulate(dis, reqs), simulate(col, reqs)
    assert dis_res.attainment(TTFT_SLO, TPOT_SLO) >= 0.9
    assert dis_res.attainment(TTFT_SLO, TPOT_SLO) > col_res.attainment(TTFT_SLO, TPOT_SLO) + 0.1
    assert col_res.percentile("tpot", 90) > TPOT_SLO > dis_res.percentile("tpot", 90)
    assert goodput(dis, _workload, TTFT_SLO, TPOT_SLO) > 1.2 * goodput(col, _workload, TTFT_SLO,
                                                                         TPOT_SLO)


@pytest.mark.parametrize("rate", [0.25, 0.5, 1.0])
def test_colocation_is_as_good_at_light_load(rate):
    """Little interference and no KV hand-off: colocated meets the SLOs as often, on the same
    two devices, and finishes requests about as fast."""
    dis, col = _pair()
    reqs = _workload(rate)
    dis_res, col_res = simulate(dis, reqs), simulate(col, reqs)
    assert col_res.attainment(TTFT_SLO, TPOT_SLO) >= dis_res.attainment(TTFT_SLO, TPOT_SLO)
    assert col_res.attainment(TTFT_SLO, TPOT_SLO) == 1.0
    # no hand-off, but a prompt arriving mid-decode waits one step on a colocated replica: a wash
    if rate <= 0.5:
        assert np.mean(col_res.e2e_s) <= 1.01 * np.mean(dis_res.e2e_s)


# -- exact timings ------------------------------------------------------------------------------
def test_single_request_timeline():
    model = Toy(c=1e-6)
    dep = SimDeployment.disaggregated(model, model)
    res = simulate(dep, [SimRequest(1.0, 300, 5)])
    assert res.ttft_s[0] == pytest.approx(0.06)
    steps = sum(model.decode_step_seconds(1, 301 + i) for i in range(4))
    assert res.finish_s[0] == pytest.approx(1.0 + 0.06 + 0.002 + steps)
    assert res.tpot_s[0] == pytest.approx((0.002 + steps) / 4)
    col = simulate(SimDeployment.colocated(model), [SimRequest(0.0, 300, 5)])
    assert col.e2e_s[0] == pytest.approx(0.06 + steps)


def _reference_decode(model, reqs, max_batch):
    """Per-step continuous batching on one replica, requests arriving straight at decode."""
    order = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    finish = [0.0] * len(reqs)
    t, nxt, active, pending = 0.0, 0, {}, []  # active: rid -> tokens still to produce
    while nxt < len(order) or pending or active:
        while nxt < len(order) and reqs[order[nxt]].arrival_s <= t:
            pending.append(order[nxt])
            nxt += 1
        while pending and len(active) < max_batch:
            rid = pending.pop(0)
            active[rid] = reqs[rid].output_tokens - 1
        if not active:
            t = reqs[order[nxt]].arrival_s
            continue
        ctx = sum(reqs[r].prompt_tokens + reqs[r].output_tokens - left for r, left in active.items())
        t += model.decode_step_seconds(len(active), ctx)
        for rid in list(active):
            active[rid] -= 1
            if active[rid] == 0:
                finish[rid] = t
                del active[rid]
    return np.array(finish)


@pytest.mark.parametrize("max_batch", [4, 256])
def test_decode_stretches_match_a_per_step_reference(max_batch):
    """Stretches of steps, cut short when a request arrives, give the same finish times as
    stepping one by one (exact for a step time affine in the context)."""
    model = Toy(per_token=0.0, transfer=0.0, c=2e-6)
    rng = np.random.default_rng(3)
    reqs = [SimRequest(float(t), int(p), int(o)) for t, p, o in zip(
        np.cumsum(rng.exponential(0.05, 300)), rng.integers(1, 500, 300),
        rng.integers(2, 120, 300))]
    res = simulate(SimDeployment.disaggregated(model, model, max_decode_batch=max_batch,
                                               reserve_between_calls=False), reqs)
    assert np.allclose(res.finish_s, _reference_decode(model, reqs, max_batch), rtol=1e-9)


def test_prefill_batches_fcfs_up_to_the_token_budget():
    """The first prompt starts alone on the idle replica (0.02 s); the next three wait, and the
    first two of them fill the 200-token budget, the last runs after them."""
    model = Toy()
    reqs = [SimRequest(0.0, 100, 2)] + [SimRequest(0.001, 100, 2)] * 3
    res = simulate(SimDeployment.disaggregated(model, model, max_prefill_tokens=200), reqs)
    assert list(res.prefill_start_s) == pytest.approx([0.0, 0.02, 0.02, 0.06])
    assert list(res.first_token_s) == pytest.approx([0.02, 0.06, 0.06, 0.08])


def test_prompts_go_to_the_shortest_prefill_queue():
    model = Toy()
    dep = SimDeployment.disaggregated(model, model, prefill_replicas=2, max_prefill_tokens=100)
    res = simulate(dep, [SimRequest(0.0, 100, 1)] * 4)
    assert list(res.first_token_s) == pytest.approx([0.02, 0.02, 0.04, 0.04])


def test_requests_wait_for_kv_room_and_oversized_ones_are_dropped():
    model = Toy()
    dep = SimDeployment.disaggregated(model, model, decode_replicas=2, kv_capacity_tokens=1000)
    reqs = [SimRequest(0.0, 500, 400), SimRequest(0.0, 500, 400), SimRequest(0.0, 500, 400),
            SimRequest(0.0, 900, 200)]
    res = simulate(dep, reqs)
    # two fit (one per replica); the third waits for the first to finish
    assert res.prefill_start_s[2] == pytest.approx(min(res.finish_s[:2]))
    assert res.dropped == 1 and np.isinf(res.ttft_s[3])
    assert res.percentile("ttft", 100) == np.inf
    assert res.attainment(10, 10) == 0.75


def test_groups_share_requests_by_weight_and_step_at_their_own_speed():
    """Decode on two kinds: the first group (one replica, weight 1) and a group twice as fast
    (one replica, weight 3). A burst of 8 goes 2 to 6, as jaxpd's router shares it (fewest
    requests per unit of weight, ties to the first), and each runs at its group's step time."""
    slow, fast = Toy(transfer=0.0), Toy(a=0.004, transfer=0.0)
    dep = SimDeployment.disaggregated(slow, slow, max_prefill_tokens=1000, decode_steps_per_dispatch=1,
                                      decode_groups=(SimGroup(fast, 1, weight=3.0),))
    res = simulate(dep, [SimRequest(0.0, 10, 21)] * 8)
    assert list(res.replica) == [1, 1, 0, 1, 1, 1, 0, 1]
    on_fast, on_slow = res.tpot_s[res.replica == 1], res.tpot_s[res.replica == 0]
    assert on_fast.max() < on_slow.min()
    assert on_slow == pytest.approx(slow.decode_step_seconds(2, 0), rel=0.05)


def test_a_request_only_a_larger_group_holds_runs_there():
    small = SimDeployment.disaggregated(Toy(), Toy(), kv_capacity_tokens=300)
    reqs = [SimRequest(0.0, 500, 10), SimRequest(0.0, 100, 10)]
    assert simulate(small, reqs).dropped == 1  # one group: it never fits
    both = dataclasses.replace(small, decode_groups=(SimGroup(Toy(), 1, kv_capacity_tokens=1000),))
    res = simulate(both, reqs)
    assert res.dropped == 0 and res.replica[0] == 1


def test_prefill_groups_take_prompts_by_weight():
    dep = SimDeployment.disaggregated(Toy(), Toy(), max_prefill_tokens=100,
                                      prefill_groups=(SimGroup(Toy(per_token=1e-4), 1, weight=2.0),))
    res = simulate(dep, [SimRequest(0.0, 100, 1)] * 3)
    # the second group's queue counts half: it takes two prompts to the first group's one
    assert sorted(res.first_token_s) == pytest.approx([0.01, 0.02, 0.02])


@pytest.mark.parametrize("chunk_size", [0, 256])
def test_prefix_cache_hits_are_neither_computed_nor_sent_nor_given_pages(chunk_size):
    """A conversation's next turn: 400 of its 500 prompt tokens are cached. Its prefill
    computes 100 tokens (after the 400, attending to them), its hand-off sends 100 tokens' KV,
    and it takes 100 + output tokens of KV room; the same prompt uncached costs 5x."""
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Tracked(Stepped):
        def kv_transfer_seconds(self, prompt_tokens):
            seen.append(prompt_tokens)
            return 1e-5 * prompt_tokens

    model = Tracked()
    dep = SimDeployment.disaggregated(model, model, chunk_size=chunk_size, kv_capacity_tokens=150)
    hit = simulate(dep, [SimRequest(0.0, 500, 10, cached_tokens=400)])
    assert hit.dropped == 0 and seen == [100]  # 110 tokens of KV fit where 510 would not
    assert model.steps == [[(400, 100)]]  # one step: the new tokens after the cached ones
    assert hit.first_token_s[0] == pytest.approx(0.01 + 100 * model.per_token)
    roomy = dataclasses.replace(dep, kv_capacity_tokens=10_000)
    cold = simulate(roomy, [SimRequest(0.0, 500, 10)])
    assert cold.first_token_s[0] > 4 * hit.first_token_s[0] - 0.05


def test_decode_batch_limit_queues_sequences():
    model = Toy(transfer=0.0)
    dep = SimDeployment.disaggregated(model, model, max_prefill_tokens=1000, max_decode_batch=2)
    res = simulate(dep, [SimRequest(0.0, 10, 11)] * 3)
    # the third joins when the first two finish 10 steps in
    assert res.finish_s[2] - res.finish_s[0] == pytest.approx(10 * model.decode_step_seconds(1, 0),
                                                              rel=0.01)


def test_result_metrics():
    model = Toy()
    res = simulate(SimDeployment.colocated(model, 1), generate("code", 2.0, 500, seed=1))
    assert res.percentile("ttft", 50) == pytest.approx(np.median(res.ttft_s))
    assert res.percentile("tpot_s", 90) == pytest.approx(np.percentile(res.tpot_s, 90))
    assert np.all(res.e2e_s >= res.ttft_s)
    assert res.attainment(np.inf, np.inf) == 1.0 and res.attainment(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        res.metric("latency")


def test_goodput_is_the_highest_rate_meeting_the_target():
    model = Toy()
    dep = SimDeployment.disaggregated(model, model)
    rate = goodput(lambda r: dep, _workload, TTFT_SLO, TPOT_SLO, target=0.9)
    assert simulate(dep, _workload(rate)).attainment(TTFT_SLO, TPOT_SLO) >= 0.9
    assert simulate(dep, _workload(rate * 1.03)).attainment(TTFT_SLO, TPOT_SLO) < 0.9
    assert goodput(dep, _workload, 0.01, TPOT_SLO) == 0.0  # TTFT below one prefill


def test_deployment_validation():
    model = Toy()
    with pytest.raises(ValueError, match="colocated"):
        SimDeployment("colocated", 1, 2, model, model)
    with pytest.raises(ValueError, match="max_decode_batch"):
        SimDeployment.disaggregated(model, model, max_decode_batch=0)
    assert SimDeployment.colocated(model, 3).replicas == 3


def test_ten_thousand_requests_are_fast():
    model = Toy()
    reqs = generate("chatbot", 8.0, 10_000, seed=0)
    for dep in (SimDeployment.disaggregated(model, model, decode_replicas=2,
                                            kv_capacity_tokens=200_000),
                SimDeployment.colocated(model, 3, kv_capacity_tokens=200_000)):
        start = time.perf_counter()
        res = simulate(dep, reqs)
        assert time.perf_counter() - start < 2.0
        assert np.all(np.isfinite(res.e2e_s))


# -- workload -----------------------------------------------------------------------------------
def test_seeds_reproduce():
    assert generate("chatbot", 3.0, 1000, seed=7) == generate("chatbot", 3.0, 1000, seed=7)
    assert generate("chatbot", 3.0, 1000, seed=7) != generate("chatbot", 3.0, 1000, seed=8)


def test_rate_only_rescales_arrivals():
    slow, fast = generate("code", 1.0, 500, seed=2), generate("code", 4.0, 500, seed=2, cv=1.0)
    assert [r.prompt_tokens for r in slow] == [r.prompt_tokens for r in fast]
    assert np.allclose([r.arrival_s / 4 for r in slow], [r.arrival_s for r in fast])
    bursty = generate("code", 4.0, 500, seed=2, cv=3.0)
    assert [r.output_tokens for r in bursty] == [r.output_tokens for r in fast]


@pytest.mark.parametrize("cv", [1.0, 0.5, 2.0])
def test_arrival_rate_and_cv(cv):
    rate = 5.0
    times = np.array([r.arrival_s for r in generate("fixed", rate, 200_000, seed=0, cv=cv,
                                                    isl=1, osl=1)])
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert np.mean(gaps) == pytest.approx(1 / rate, rel=0.02)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(cv, rel=0.03)


@pytest.mark.parametrize("kind", sorted(DISTRIBUTIONS))
def test_length_distributions(kind):
    dist = DISTRIBUTIONS[kind]
    reqs = generate(kind, 1.0, 100_000, seed=0)
    prompts = np.array([r.prompt_tokens for r in reqs])
    outputs = np.array([r.output_tokens for r in reqs])
    assert prompts.min() >= 1 and prompts.max() <= dist.prompt_max
    assert outputs.min() >= 1 and outputs.max() <= dist.output_max
    # documented means are before clipping: compare with the clipped lognormal's mean
    assert np.mean(prompts) == pytest.approx(
        _clipped_mean(dist.prompt_mean, dist.prompt_sigma, dist.prompt_max), rel=0.02)
    assert np.mean(outputs) == pytest.approx(
        _clipped_mean(dist.output_mean, dist.output_sigma, dist.output_max), rel=0.02)


def _clipped_mean(mean, sigma, upper):
    """E[min(X, upper)] for a lognormal X with this mean: E[X; X < c] + c P(X >= c)."""
    from scipy.stats import norm
    mu = np.log(mean) - sigma**2 / 2
    z = (np.log(upper) - mu) / sigma
    return mean * norm.cdf(z - sigma) + upper * norm.sf(z)


def test_fixed_lengths_and_overrides():
    reqs = generate("fixed", 1.0, 10, isl=64, osl=8)
    assert {(r.prompt_tokens, r.output_tokens) for r in reqs} == {(64, 8)}
    assert {r.output_tokens for r in generate("chatbot", 1.0, 50, osl=3)} == {3}
    with pytest.raises(ValueError, match="needs both isl and osl"):
        generate("fixed", 1.0, 10, isl=64)
    with pytest.raises(ValueError, match="unknown workload kind 'chat'"):
        generate("chat", 1.0, 10)
    with pytest.raises(ValueError, match="rate"):
        generate("code", 0.0, 10)
    with pytest.raises(ValueError, match="cv"):
        generate("code", 1.0, 10, cv=0.0)


def test_trace_round_trip_jsonl_and_csv(tmp_path):
    reqs = generate("summarization", 2.0, 20, seed=4)
    dump_trace(reqs, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == reqs
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("timestamp,prompt_tokens,output_tokens,user\n2.5,10,3,a\n0.5,7,1,b\n")
    assert load_trace(csv_path) == [SimRequest(0.5, 7, 1), SimRequest(2.5, 10, 3)]
    hits = [SimRequest(0.0, 500, 10, 400), SimRequest(1.0, 50, 5)]  # prefix-cache hits kept
    dump_trace(hits, tmp_path / "hits.jsonl")
    assert load_trace(tmp_path / "hits.jsonl") == hits


@pytest.mark.parametrize("text, message", [
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 2}\n{"arrival_s": 1,\n',
     "trace.jsonl:2: not valid JSON"),
    ('\n{"arrival_s": 0, "output_tokens": 2}\n', "trace.jsonl:2: missing field 'prompt_tokens'"),
    ('{"prompt_tokens": 5, "output_tokens": 2}\n',
     "trace.jsonl:1: missing field 'arrival_s' or 'timestamp'"),
    ('{"arrival_s": 0, "prompt_tokens": 2.5, "output_tokens": 2}\n',
     "trace.jsonl:1: prompt_tokens must be an integer >= 1, got 2.5"),
    ('{"arrival_s": -1, "prompt_tokens": 5, "output_tokens": 2}\n',
     "trace.jsonl:1: arrival_s must be >= 0"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": "x"}\n',
     "trace.jsonl:1: output_tokens must be a number, got 'x'"),
    ('[1, 2, 3]\n', "trace.jsonl:1: expected an object"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 2, "cached_tokens": 5}\n',
     "trace.jsonl:1: cached_tokens must be an integer in [0, prompt_tokens=5), got 5"),
    ('\n\n', "trace.jsonl: trace holds no requests"),
])
def test_trace_errors_name_the_line(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trace.jsonl").write_text(text)
    with pytest.raises(TraceError) as err:
        load_trace("trace.jsonl")
    assert str(err.value).startswith(message)


def test_csv_trace_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trace.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,5,2\n1,0,2\n")
    with pytest.raises(TraceError, match=r"^trace.csv:3: prompt_tokens must be an integer >= 1"):
        load_trace("trace.csv")
    (tmp_path / "trace.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,5,2,9\n")
    with pytest.raises(TraceError, match=r"^trace.csv:2: more values than header columns"):
        load_trace("trace.csv")
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace("missing.jsonl")


def test_the_router_refuses_past_its_queue_bound_and_timeout():
    """As jaxpd's router: with every KV pool full, at most `max_queued` requests wait (the
    rest are refused at once: RESOURCE_EXHAUSTED), and one waiting past `queue_timeout_s` is
    refused when its turn comes; refused requests never run and miss their SLOs."""
    from jaxpd.placement.simulator import SimDeployment, simulate
    from jaxpd.placement.workload import SimRequest

    class Slow:
        def prefill_seconds(self, lengths):
            return 0.01

        def decode_step_seconds(self, batch, context):
            return 0.1  # each request holds its KV ~1 s

        def kv_transfer_seconds(self, tokens):
            return 0.0

    # KV for one request at a time; 6 arrive together
    reqs = [SimRequest(0.0, 10, 11) for _ in range(6)]
    dep = SimDeployment.disaggregated(Slow(), Slow(), kv_capacity_tokens=21, max_queued=2,
                                      queue_timeout_s=1.5)
    result = simulate(dep, reqs)
    ran = np.isfinite(result.finish_s)
    assert result.rejected == 4 and ran.sum() == 2  # 3 queued past the bound; 1 timed out
    assert ran[0] and ran[1] and not ran[2:].any()
    assert result.attainment(100.0, 100.0) == pytest.approx(2 / 6)
    unbounded = simulate(SimDeployment.disaggregated(Slow(), Slow(), kv_capacity_tokens=21,
                                                     max_queued=10, queue_timeout_s=100.0), reqs)
    assert unbounded.rejected == 0 and np.isfinite(unbounded.finish_s).all()


# -- the engine's own shapes: chunks, buckets, decode calls, a shared host ----------------------
@dataclasses.dataclass(frozen=True)
class Stepped(Toy):
    """Toy with a fixed cost per prefill step (so chunking shows), recording each step's chunks."""

    step: float = 0.01
    steps: list = dataclasses.field(default_factory=list)

    def prefill_step_seconds(self, chunks):
        self.steps.append(list(chunks))
        return self.step + self.per_token * sum(length for _, length in chunks)


def test_chunked_prefill_takes_a_step_per_chunk_within_the_budget():
    """As the engine schedules: the first prompt starts alone; then up to 256 tokens of each
    prompt per step, in arrival order, until the 300-token budget is spent."""
    model = Stepped()
    dep = SimDeployment.disaggregated(model, model, chunk_size=256, max_prefill_tokens=300)
    res = simulate(dep, [SimRequest(0.0, 500, 2), SimRequest(0.0, 100, 2)])
    assert model.steps == [[(0, 256)], [(256, 244), (0, 56)], [(56, 44)]]
    first, second, third = 0.01 + 256 * 2e-4, 0.01 + 300 * 2e-4, 0.01 + 44 * 2e-4
    assert list(res.first_token_s) == pytest.approx([first + second, first + second + third])
    assert list(res.prefill_start_s) == pytest.approx([0.0, first])


def test_chunked_prefill_is_priced_at_the_padded_step_shape():
    """A 100-token prompt runs as a 128-token chunk; three short prompts as four rows (the
    batch bucket) of 64 tokens (the longest one's bucket)."""
    model = Stepped()
    dep = SimDeployment.disaggregated(model, model, chunk_size=256, prefill_batch_buckets=(1, 2, 4),
                                      prefill_chunk_buckets=(16, 32, 64, 128, 256))
    simulate(dep, [SimRequest(0.0, 100, 2)] + [SimRequest(0.001, n, 2) for n in (20, 40, 10)])
    assert model.steps == [[(0, 128)], [(0, 64)] * 4]


def test_a_chunk_that_would_pad_the_step_past_the_budget_waits():
    """As the engine: 1,800 and 248 tokens would run as 2 x 2,048 (the long chunk's bucket),
    twice the 2,048-token budget, so the 248-token prompt takes the next step."""
    model = Stepped()
    dep = SimDeployment.disaggregated(model, model, chunk_size=2048, max_prefill_tokens=2048,
                                      prefill_batch_buckets=(1, 2, 4),
                                      prefill_chunk_buckets=(256, 512, 1024, 2048))
    simulate(dep, [SimRequest(0.0, 1800, 2), SimRequest(0.0, 248, 2), SimRequest(0.0, 200, 2)])
    assert model.steps == [[(0, 2048)], [(0, 256), (0, 256)]]


def _busy_decoder(**limits):
    """Request 0 decodes 49 steps from t=0.022 (prefill 0.02 s, hand-off 0.002 s) in calls of
    4 steps of 8.1 ms; request 1 arrives at t=0.03, in the middle of the first call."""
    model = Toy()
    dep = SimDeployment.disaggregated(model, model, decode_steps_per_dispatch=4, **limits)
    return simulate(dep, [SimRequest(0.0, 100, 50), SimRequest(0.03, 100, 50)])


def test_a_reservation_is_answered_at_once_or_between_calls():
    """jaxpd answers while the decode call runs (the default); an engine that answers only
    between calls makes the prompt wait for the call in flight."""
    call_end = 0.022 + 4 * 0.0081
    res = _busy_decoder(reserve_between_calls=True)
    assert res.placed_s[1] == pytest.approx(0.03)  # its KV is held from arrival ...
    assert res.prefill_start_s[1] == pytest.approx(call_end)  # ... prefill starts after the call
    assert res.first_token_s[1] == pytest.approx(call_end + 0.02)
    at_once = _busy_decoder()
    assert at_once.prefill_start_s[1] == pytest.approx(0.03)


def test_a_shared_host_slows_prefill_beside_a_decoding_replica():
    res = _busy_decoder(shared_host_slowdown=1.5)
    assert res.first_token_s[0] == pytest.approx(0.02)  # nothing was decoding yet
    assert res.first_token_s[1] == pytest.approx(0.03 + 1.5 * 0.02)  # prefilled mid-call
    with pytest.raises(ValueError, match="shared_host_slowdown"):
        SimDeployment.disaggregated(Toy(), Toy(), shared_host_slowdown=0.5)


def test_colocated_prefill_joins_at_the_next_decode_call_boundary():
    """Colocated, a new prompt waits for the decode call in flight (4 steps), not the whole
    stretch to the next finish, and decode resumes after its prefill."""
    model = Toy()
    dep = SimDeployment.colocated(model, decode_steps_per_dispatch=4)
    res = simulate(dep, [SimRequest(0.0, 100, 50), SimRequest(0.03, 100, 50)])
    assert res.prefill_start_s[1] == pytest.approx(0.02 + 4 * 0.0081)
    assert res.first_token_s[1] == pytest.approx(0.02 + 4 * 0.0081 + 0.02)
