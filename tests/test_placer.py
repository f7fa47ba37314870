"""The placer: the MILP finds the exhaustive optimum; options follow the cost model."""

import random

import pytest

from jaxpd.model.presets import get_preset
from jaxpd.placement.cost_model import Roofline
from jaxpd.placement.placer import (Demand, Option, PoolSpec, options, ranked, solve,
                                    solve_exhaustive)

H100 = Roofline(flops=989e12, bandwidth=3.35e12, memory=80e9, link_bandwidth=450e9)
L4 = Roofline(flops=121e12, bandwidth=0.3e12, memory=24e9, link_bandwidth=0.0)
LLAMA8B = get_preset("llama3-8b").replace(dtype="bfloat16")


def _random_case(rng: random.Random):
    pools = [PoolSpec(f"p{i}", "x", "nvidia", rng.randint(1, 8), rng.choice([0.7, 1.3, 2.0, 4.1]),
                      H100, 8) for i in range(rng.randint(1, 3))]
    opts = []
    for pool in pools:
        for tp in (1, 2, 4):
            for role in ("prefill", "decode", "colocated"):
                if rng.random() < 0.6:
                    opts.append(Option(role, pool.name, tp, rng.uniform(0.3, 6.0) * tp ** 0.8,
                                       tp * pool.price_per_device_hour, ""))
    return pools, opts, rng.uniform(0.5, 20.0)


def _random_constraints(rng: random.Random, opts):
    pairs = [(i, j) for i, p in enumerate(opts) if p.role == "prefill"
             for j, d in enumerate(opts) if d.role == "decode"]
    incompatible = {pair for pair in pairs if rng.random() < 0.3}
    budget = rng.choice([None, rng.uniform(2.0, 60.0)])
    return incompatible, budget


@pytest.mark.parametrize("objective", ["cost", "goodput-per-dollar"])
def test_milp_matches_the_exhaustive_optimum_on_random_cases(objective):
    rng = random.Random(0 if objective == "cost" else 1)
    checked = infeasible = combined = 0
    for _ in range(150):
        pools, opts, rate = _random_case(rng)
        incompatible, budget = _random_constraints(rng, opts)
        kwargs = dict(objective=objective, budget=budget, incompatible=incompatible)
        best, milp = solve_exhaustive(opts, pools, rate, **kwargs), solve(opts, pools, rate, **kwargs)
        if best is None:
            assert milp is None
            infeasible += 1
            continue
        assert milp is not None
        if objective == "cost":
            assert milp.cost_per_hour == pytest.approx(best.cost_per_hour, rel=1e-9)
        else:
            assert milp.capacity / milp.cost_per_hour == pytest.approx(
                best.capacity / best.cost_per_hour, rel=1e-7)
        assert milp.capacity >= rate - 1e-9
        assert budget is None or milp.cost_per_hour <= budget + 1e-9
        index = {id(o): i for i, o in enumerate(opts)}
        picked = [index[id(o)] for o, _ in milp.choices]
        assert not any((i, j) in incompatible for i in picked for j in picked)
        assert all(len(milp.roles(r)) <= 2 for r in ("prefill", "decode", "colocated"))
        checked += 1
        combined += any(len(best.roles(r)) > 1 for r in ("prefill", "decode", "colocated"))
    assert checked > 60 and infeasible > 3  # both kinds of case occurred
    assert combined > 5  # optima that run a role on two options at once occurred


def test_ranked_plans_are_distinct_and_in_order():
    rng = random.Random(7)
    for _ in range(20):
        pools, opts, rate = _random_case(rng)
        plans = ranked(opts, pools, rate, 5)
        if len(plans) >= 3:
            break
    assert len(plans) >= 3
    costs = [p.cost_per_hour for p in plans]
    assert costs == sorted(costs)
    assert costs[0] == pytest.approx(solve_exhaustive(opts, pools, rate).cost_per_hour)
    structures = [tuple((o.role, o.pool, o.tp) for o, _ in p.choices) for p in plans]
    assert len(set(structures)) == len(structures)


def test_options_follow_the_rooflines_and_the_plan_beats_every_single_pool():
    pools = [PoolSpec("h100", "h100-sxm", "nvidia", 8, 4.0, H100, 8),
             PoolSpec("l4", "l4", "nvidia", 16, 0.8, L4, 1)]
    demand = Demand(rate=30.0, isl_mean=1024, isl_p90=2048, osl_mean=256, ttft_slo=0.5, tpot_slo=0.1)
    opts = {(o.role, o.pool, o.tp): o for o in options(LLAMA8B, pools, demand)}
    # compute-bound prefill: an H100 replica carries far more prompts than an L4 one
    l4_prefill = opts.get(("prefill", "l4", 1))
    assert l4_prefill is None or opts[("prefill", "h100", 1)].capacity > 5 * l4_prefill.capacity
    # L4 has no NVLink: no TP > 1 there; TP on H100 shortens prefill
    assert all(o.tp == 1 for o in opts.values() if o.pool == "l4")
    assert opts[("prefill", "h100", 2)].capacity > opts[("prefill", "h100", 1)].capacity
    plan = solve(list(opts.values()), pools, demand.rate)
    for o, n in plan.choices:
        assert n * o.capacity >= demand.rate
    singles = [solve([o for o in opts.values() if o.pool == p.name], pools, demand.rate) for p in pools]
    assert all(plan.cost_per_hour <= s.cost_per_hour for s in singles if s is not None)


def test_nothing_fits_gives_no_plan():
    pools = [PoolSpec("l4", "l4", "nvidia", 1, 0.8, L4, 1)]
    demand = Demand(rate=1.0, isl_mean=512, isl_p90=1024, osl_mean=128, ttft_slo=1.0, tpot_slo=0.05)
    seventy = get_preset("llama3-70b").replace(dtype="bfloat16")
    assert options(seventy, pools, demand) == []
    assert solve([], pools, 1.0) is None


def test_plans_become_configs_that_jaxpd_serve_accepts():
    import yaml

    from jaxpd.config import parse_config
    from jaxpd.placement.deploy_yaml import plan_yaml
    from jaxpd.placement.placer import Plan

    pre = Option("prefill", "h100", 2, 10.0, 8.0, "")
    same = Option("decode", "h100", 1, 10.0, 4.0, "")
    other = Option("decode", "l4", 1, 3.0, 0.8, "")
    col = Option("colocated", "a100", 4, 5.0, 10.0, "")
    from jaxpd.placement.catalog import parse_inventory

    pools = {p.name: p for p in parse_inventory({"pools": [
        {"name": n, "device": d, "count": 16} for n, d in
        (("h100", "h100-sxm"), ("l4", "l4"), ("a100", "a100-80gb"))]}, "<test>")}
    for plan in (Plan(((pre, 2), (same, 3))), Plan(((pre, 1), (other, 4))), Plan(((col, 2),))):
        text = plan_yaml(plan, checkpoint="/models/llama", pools=pools)
        cfg = parse_config(yaml.safe_load(text))
        assert text.startswith("# Written by `jaxpd place`")
        if plan.colocated:
            assert cfg.mode == "colocated" and cfg.prefill[0].devices == list(range(8))
            continue
        assert cfg.prefill[0].replicas == plan.choices[0][1] and cfg.prefill[0].tp == 2
        assert cfg.decode[0].replicas == plan.choices[1][1]
        if plan.choices[1][0].pool == "h100":  # one pool: decode after prefill's devices
            assert cfg.decode[0].devices == [4, 5, 6]
        else:
            assert cfg.decode[0].devices == [0, 1, 2, 3] and cfg.decode[0].host == "0.0.0.0"
        assert "PREFILL_POOL_HOST" not in text and "DECODE_POOL_HOST" not in text
    fp8 = parse_config(yaml.safe_load(plan_yaml(plan, checkpoint="/m", pools=pools,
                                                weight_dtype="float8_e4m3fn")))
    assert (fp8.model.dtype, fp8.model.weight_dtype) == ("bfloat16", "float8_e4m3fn")


def test_decode_runs_on_two_pools_when_neither_alone_suffices():
    """At 11 req/s decode needs more than all 4 v6e chips (10 req/s) or all 8 v5e chips
    (8 req/s) carry, so the plan runs decode on both, and the YAML writes two weighted decode
    groups the router shares requests by."""
    import yaml

    from jaxpd.config import parse_config
    from jaxpd.deploy import kubernetes
    from jaxpd.placement.deploy_yaml import plan_yaml

    pools = [PoolSpec("v5e", "tpu-v5e", "google", 8, 1.2, H100, 8),
             PoolSpec("v6e", "tpu-v6e", "google", 4, 2.7, H100, 8),
             PoolSpec("l4", "l4", "nvidia", 8, 0.8, L4, 1)]
    opts = [Option("prefill", "l4", 1, 4.0, 0.8, ""),
            Option("decode", "v5e", 1, 1.0, 1.2, "", 64, 200_000),
            Option("decode", "v6e", 1, 2.5, 2.7, "", 128, 400_000)]
    plan = solve(opts, pools, 11.0)
    assert [(o.pool, n) for o, n in plan.roles("decode")] == [("v5e", 1), ("v6e", 4)]
    assert plan.cost_per_hour == pytest.approx(3 * 0.8 + 1.2 + 4 * 2.7)
    assert solve_exhaustive(opts, pools, 11.0).cost_per_hour == pytest.approx(plan.cost_per_hour)
    assert solve(opts, pools, 11.0, max_per_role=1) is None  # one option per role: no plan
    by_name = {p.name: p for p in pools}
    cfg = parse_config(yaml.safe_load(plan_yaml(plan, checkpoint="/models/m", pools=by_name,
                                                model_volume={"claim": "weights"})))
    first, second = cfg.decode
    assert (first.accelerator, first.replicas, first.weight) == ("tpu-v5e", 1, 1.0)
    assert (second.accelerator, second.replicas, second.weight) == ("tpu-v6e", 4, 2.5)
    # the scheduler takes the largest batch and pool; the other group writes its own
    assert cfg.scheduler.max_decode_batch == 128 and second.max_decode_batch is None
    assert first.max_decode_batch == 64 and first.num_pages == 200_000 // 16
    assert second.port >= first.port + first.replicas  # groups never share a port
    objects = kubernetes.render(cfg, image="img")
    sets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "StatefulSet"}
    assert sorted(sets) == ["jaxpd-decode-g0", "jaxpd-decode-g1", "jaxpd-prefill"]
    selectors = [tuple(sorted(s["spec"]["selector"]["matchLabels"].items())) for s in sets.values()]
    assert len(set(selectors)) == 3  # no workload adopts another's pods
    args = sets["jaxpd-decode-g1"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--group") + 1] == "1"
    router = next(o for o in objects if o["kind"] == "Deployment")
    rargs = router["spec"]["template"]["spec"]["containers"][0]["args"]
    decode = rargs[rargs.index("--decode-addresses") + 1].split(",")
    assert len(decode) == 5 and decode[-1].startswith("jaxpd-decode-g1-3.jaxpd-decode-g1:")
    pods = parse_config(yaml.safe_load(next(o for o in objects if o["kind"] == "ConfigMap")[
        "data"]["deploy.yaml"]))  # what the pods read: both groups, listening on 0.0.0.0
    assert [g.host for g in pods.decode] == ["0.0.0.0", "0.0.0.0"] and pods.replicas("decode") == 5
    from jaxpd.serving.serve_cli import _replica_in_group
    assert _replica_in_group(pods, "decode", 1, 3) == 4  # pod 3 of the second group: decode-4
