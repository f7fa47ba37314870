#!/usr/bin/env python3
"""Do the placer's plans hold? Random cases, each plan written as YAML and replayed by
`jaxpd simulate` on arrivals the placer never saw.

For each case: an inventory of 1-3 device kinds from the catalog (random counts), a workload
(chatbot, code, summarization), a rate and TTFT/TPOT SLOs drawn around what the model needs on
those devices; `jaxpd place` picks a plan (or says none is reachable), the plan is written as
the deployment YAML it would deploy, and `jaxpd simulate` replays that file at `--requests`
requests with a seed the placer did not use. A case passes when the replay's attainment meets
the SLO target. With `--docs`, the plans of docs/placement.md are checked the same way.

    python tools/check_placer.py --cases 30 --seed 0 [--docs] [--requests 20000]

Prints one JSON object: every case (inventory, workload, rate, SLOs, plan, cost, the placer's
attainment and the replay's), and how many plans held.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = ("h100-sxm", "a100-80gb", "l4", "l40s", "tpu-v5e", "tpu-v6e", "h200")
WORKLOADS = {"chatbot": (0.25, 0.04), "code": (0.15, 0.1), "summarization": (1.5, 0.06)}
DOC_CASES = [  # docs/placement.md
    dict(inventory="configs/inventory/mixed-gpu.yaml", model="llama3-8b", workload="chatbot",
         rate=100.0, ttft=0.25, tpot=0.03),
    dict(inventory="configs/inventory/mixed-gpu.yaml", model="llama3-8b",
         workload="summarization", rate=50.0, ttft=1.5, tpot=0.05),
    dict(inventory="configs/inventory/mixed-gpu.yaml", model="llama3-8b", workload="code",
         rate=200.0, ttft=0.125, tpot=0.2),
]


def random_case(rng: random.Random, index: int, folder: Path) -> dict:
    kinds = rng.sample(KINDS, rng.randint(1, 3))
    pools = [{"name": f"p{i}-{k}", "device": k, "count": rng.choice([8, 16, 32, 64])}
             for i, k in enumerate(kinds)]
    path = folder / f"inventory-{index}.yaml"
    path.write_text(json.dumps({"pools": pools}))  # JSON is YAML
    workload = rng.choice(sorted(WORKLOADS))
    ttft, tpot = WORKLOADS[workload]
    scale = rng.choice([0.7, 1.0, 1.5, 2.0])
    return dict(inventory=str(path), model=rng.choice(["llama3-8b", "llama3-8b", "llama3-70b"]),
                workload=workload, rate=float(rng.choice([5, 10, 20, 50, 100])),
                ttft=round(ttft * scale, 3), tpot=round(tpot * scale, 3), pools=pools)


def jaxpd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxpd.cli", *args], capture_output=True,
                          text=True, cwd=REPO)


def check(case: dict, folder: Path, index: int, requests: int, seed: int) -> dict:
    out = folder / f"plan-{index}.yaml"
    slos = ["--slo", f"ttft_p90={case['ttft']}", "--slo", f"tpot_p90={case['tpot']}"]
    placed = jaxpd("place", "--inventory", case["inventory"], "--model", case["model"],
                   "--workload", case["workload"], "--rate", str(case["rate"]), *slos,
                   "--json", "--out", str(out))
    row = {k: v for k, v in case.items() if k != "inventory" or "pools" not in case}
    if placed.returncode == 1:
        row.update(plan=None, why=placed.stderr.strip().splitlines()[-1])
        return row
    if placed.returncode != 0:
        row.update(plan=None, error=placed.stderr.strip()[-300:])
        return row
    summary = json.loads(placed.stdout)
    row.update(plan={r: summary.get(r) for r in ("prefill", "decode", "colocated")},
               cost_per_hour=summary["cost_per_hour"],
               placer_attainment=summary.get("slo_attainment"))
    replay = jaxpd("simulate", "--config", str(out), "--model", case["model"], "--workload",
                   case["workload"], "--rate", str(case["rate"]), "--requests", str(requests),
                   "--seed", str(seed), *slos, "--json")
    if replay.returncode != 0:
        row.update(error=replay.stderr.strip()[-300:])
        return row
    sim = json.loads(replay.stdout)
    row.update(replay_attainment=sim["attainment"], replay_ttft_p90=sim["ttft_p90"],
               replay_tpot_p90=sim["tpot_p90"], held=sim["meets_slo"])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--replay-seed", type=int, default=424242, help="seed of the replays")
    ap.add_argument("--docs", action="store_true", help="also the plans of docs/placement.md")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = (list(DOC_CASES) if args.docs else []) + \
            [random_case(rng, i, folder) for i in range(args.cases)]
        for i, case in enumerate(cases):
            row = check(case, folder, i, args.requests, args.replay_seed)
            rows.append(row)
            state = ("no plan" if row.get("plan") is None else
                     "held" if row.get("held") else "MISSED")
            print(f"[{i + 1}/{len(cases)}] {case['workload']} {case['rate']:g} req/s "
                  f"{case['model']}: {state} {row.get('replay_attainment', '')}",
                  file=sys.stderr)
    planned = [r for r in rows if r.get("plan") is not None]
    print(json.dumps({"cases": rows, "planned": len(planned),
                      "held": sum(1 for r in planned if r.get("held")),
                      "requests": args.requests, "replay_seed": args.replay_seed}, indent=1))
    return 0 if all(r.get("held") for r in planned) else 1


if __name__ == "__main__":
    raise SystemExit(main())
