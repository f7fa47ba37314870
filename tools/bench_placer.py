"""Placer benchmark: solver runtime on a 1,000-device inventory, optimality gap against the
exhaustive oracle on small inventories, and the cost model's error against measured profiles.

    .venv/bin/python tools/bench_placer.py                      # everything, one JSON object
    .venv/bin/python tools/bench_placer.py --cases 500 --model llama3-70b

Goals (issue 8): the analytic placer (options + MILP) under 2 s on 1,000 devices of 6 kinds;
gap 0 against exhaustive search; prediction error within 10% on each profile. `place_s` also
times the simulator check of the leading plans, which `jaxpd place` adds on top.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _solver_runtime(model, inventory: Path, rate: float, slo, workload, repeats: int) -> dict:
    from jaxpd.placement.catalog import load_inventory
    from jaxpd.placement.place import place
    from jaxpd.placement.placer import incompatible_pairs, options, ranked

    pools = load_inventory(inventory)
    demand = workload.demand(rate, slo)
    times, plan_count = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        opts = options(model, pools, demand)
        bad = incompatible_pairs(model, opts, pools, demand)
        plans = ranked(opts, pools, rate, 5, incompatible=bad)
        times.append(time.perf_counter() - t)
        plan_count = len(plans)
    t = time.perf_counter()
    placement = place(model, pools, workload, rate, slo, compare_single_kinds=False)
    place_s = time.perf_counter() - t
    best = placement.best
    return {"inventory": str(inventory.relative_to(REPO)), "devices": sum(p.count for p in pools),
            "kinds": len({p.device for p in pools}), "options": len(opts),
            "incompatible_pairs": len(bad), "plans_ranked": plan_count,
            "solve_s_median": statistics.median(times), "solve_s_max": max(times),
            "goal_s": 2.0, "place_with_simulation_s": place_s,
            "best": best.plan.describe() if best else None,
            "best_cost_per_hour": best.cost_per_hour if best else None,
            "unreachable": placement.unreachable}


def _optimality_gap(model, cases: int, seed: int) -> dict:
    from jaxpd.placement.catalog import load_catalog, parse_inventory
    from jaxpd.placement.place import Slo, Workload
    from jaxpd.placement.placer import incompatible_pairs, options, solve, solve_exhaustive

    catalog = load_catalog()
    rng = random.Random(seed)
    gaps = {"cost": [], "goodput-per-dollar": []}
    infeasible = 0
    solve_s, exhaustive_s = [], []
    for _ in range(cases):
        kinds = rng.sample(sorted(catalog), rng.randint(1, 3))
        data = {"pools": [{"name": k, "device": k, "count": rng.randint(1, 8)} for k in kinds]}
        pools = parse_inventory(data, "<random>", catalog)
        slo = Slo(rng.choice([0.25, 0.5, 1.0, 2.0]), rng.choice([0.03, 0.05, 0.1, 0.2]))
        workload = Workload(rng.choice(["chatbot", "code", "summarization"]))
        rate = rng.uniform(0.5, 60.0)
        demand = workload.demand(rate, slo, samples=2000)
        opts = options(model, pools, demand)
        bad = incompatible_pairs(model, opts, pools, demand)
        for objective, gap in gaps.items():
            budget = rng.choice([None, rng.uniform(5, 80)]) if objective != "cost" else None
            t = time.perf_counter()
            got = solve(opts, pools, rate, objective=objective, budget=budget, incompatible=bad)
            solve_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            best = solve_exhaustive(opts, pools, rate, objective=objective, budget=budget,
                                    incompatible=bad)
            exhaustive_s.append(time.perf_counter() - t)
            if best is None or got is None:
                if (best is None) != (got is None):
                    gap.append(float("inf"))
                infeasible += best is None
                continue
            if objective == "cost":
                gap.append(got.cost_per_hour / best.cost_per_hour - 1)
            else:
                gap.append(1 - (got.capacity / got.cost_per_hour)
                           / (best.capacity / best.cost_per_hour))
    return {"cases": cases, "infeasible_cases": infeasible,
            "max_gap_cost": max(gaps["cost"], default=0.0),
            "max_gap_goodput_per_dollar": max(gaps["goodput-per-dollar"], default=0.0),
            "compared": {k: len(v) for k, v in gaps.items()}, "goal_gap": 0.0,
            "milp_s_mean": statistics.mean(solve_s), "exhaustive_s_mean": statistics.mean(exhaustive_s)}


def _profile_errors(profiles: Path) -> list[dict]:
    """In-sample error of the calibrated model, and leave-one-out (fit without a row, predict
    it): the honest figure for a row the profile did not measure."""
    import dataclasses

    from jaxpd.placement.cost_model import Profile, calibrate, prediction_errors

    out = []
    for path in sorted(profiles.glob("*.json")):
        profile = Profile.load(path)
        errors = prediction_errors(profile, calibrate(profile))
        loo = {"prefill": [], "decode": []}
        for phase in loo:
            rows = getattr(profile, phase)
            for i in range(len(rows)):
                held = dataclasses.replace(profile, **{phase: rows[:i] + rows[i + 1:]})
                probe = dataclasses.replace(profile, prefill=[rows[i]] if phase == "prefill" else [],
                                            decode=[rows[i]] if phase == "decode" else [])
                loo[phase].append(prediction_errors(probe, calibrate(held))[phase][0])
        meta = json.loads(path.read_text())
        out.append({"profile": str(path.relative_to(REPO)), "device_key": meta.get("device_key"),
                    "preset": meta.get("preset"), "rows": len(profile.prefill) + len(profile.decode),
                    "prefill_max_abs_error": max(map(abs, errors["prefill"])),
                    "prefill_mean_abs_error": statistics.mean(map(abs, errors["prefill"])),
                    "decode_max_abs_error": max(map(abs, errors["decode"])),
                    "decode_mean_abs_error": statistics.mean(map(abs, errors["decode"])),
                    "loo_prefill_max_abs_error": max(map(abs, loo["prefill"])),
                    "loo_decode_max_abs_error": max(map(abs, loo["decode"])),
                    "goal": 0.10})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", help="preset (default llama3-8b)")
    ap.add_argument("--inventory", default=str(REPO / "configs/inventory/large-1000.yaml"))
    ap.add_argument("--rate", type=float, default=400.0, help="req/s on the large inventory")
    ap.add_argument("--cases", type=int, default=200, help="random small inventories")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profiles", default=str(REPO / "configs/profiles"))
    args = ap.parse_args(argv)

    from jaxpd.model.presets import get_preset
    from jaxpd.placement.place import Slo, Workload

    model = get_preset(args.model).replace(dtype="bfloat16")
    result = {"model": args.model,
              "large": _solver_runtime(model, Path(args.inventory).resolve(), args.rate,
                                       Slo(0.25, 0.05), Workload("chatbot"), args.repeats),
              "optimality": _optimality_gap(model, args.cases, args.seed),
              "cost_model": _profile_errors(Path(args.profiles))}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
