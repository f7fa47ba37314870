"""`jaxpd simulate`: replay a deployment YAML (the placer's, or one written by hand) in the
placer's discrete-event simulator, so a plan can be checked on arrivals it was not chosen on.

    jaxpd simulate --config deploy.yaml --model llama3-8b --workload chatbot --rate 100 \\
        --requests 20000 --seed 7 --slo ttft_p90=0.25 --slo tpot_p90=0.03 --json

Each group's replicas are priced by the cost model on its `accelerator` (a catalog key, as
`jaxpd place` writes it; calibrated from `--profiles` where a profile of that device exists),
or, for a group without one, on the device a `--profile` was measured on: the one of the
group's TP degree when several are given (default: this project's CPU profiles of the embedded
model, taken through the engine at TP 1 and 2). Engine limits come from the YAML:
`scheduler.chunk_size`, `scheduler.max_prefill_tokens`, `scheduler.max_decode_batch`,
`scheduler.decode_steps_per_dispatch`, the step buckets, and `kv.num_pages x kv.page_size`
tokens of KV per decode (or colocated) replica. When prefill and decode both run on host
devices of one machine, their shared cores slow a prefill step beside a decoding
worker by the slowdown the prefill profile measured (`tools/bench_engine.py
--alongside-decode`). The KV hand-off is priced at the config's `serving.transport` as jaxpd
measured it (`placer.TRANSPORT_BYTES_PER_S`), capped between hosts by the slower end's network
(both groups on one host of one accelerator kind count as one host).

Exit status: 0, or 2 for bad input (a line naming the flag or YAML key).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from jaxpd.placement.place_cli import (DEFAULT_PROFILES, UsageError, _positive_float, _slo,
                                       _slos, _workload)

# this CPU through the engine a worker runs, at the TP degrees configs/local.yaml uses
DEFAULT_PROFILE = [str(DEFAULT_PROFILES / f"cpu-2core-vm-default-engine-tp{tp}.json")
                   for tp in (1, 2)]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="replay a deployment YAML in the placer's simulator (TTFT, TPOT, "
                         "attainment, goodput)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay a deployment config in the discrete-event simulator the placer "
                    "uses: the same router, engine limits and cost model, on a workload and "
                    "rate of your choosing.",
        epilog="examples:\n"
               "  jaxpd simulate --config deploy.yaml --model llama3-8b --workload chatbot "
               "--rate 100 \\\n      --requests 20000 --seed 7 --slo ttft_p90=0.25 "
               "--slo tpot_p90=0.03 --json\n"
               "  jaxpd simulate --config configs/local.yaml --workload code --rate 2 "
               "--requests 200")
    p.add_argument("--config", required=True, metavar="YAML", help="the deployment config")
    p.add_argument("--model", metavar="PRESET|DIR",
                   help="the model (default: the config's model.checkpoint, or the embedded "
                        "model when it is null)")
    p.add_argument("--workload", default="chatbot", metavar="KIND|FILE",
                   help="chatbot, code, summarization, fixed (with --isl/--osl), or a trace")
    p.add_argument("--isl", type=int, metavar="N", help="fixed prompt length (tokens)")
    p.add_argument("--osl", type=int, metavar="N", help="fixed output length (tokens)")
    p.add_argument("--rate", required=True, type=_positive_float, metavar="R",
                   help="requests per second (Poisson arrivals; a trace is rescaled to it)")
    p.add_argument("--requests", type=int, default=20_000, metavar="N",
                   help="requests to replay (default 20000)")
    p.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    p.add_argument("--slo", action="append", type=_slo, default=[], metavar="METRIC=S",
                   help="ttft_pNN=SECONDS and tpot_pNN=SECONDS: attainment and goodput need both")
    p.add_argument("--attainment", type=float, metavar="F",
                   help="share of requests that must meet both SLOs for goodput (default: the "
                        "percentile)")
    p.add_argument("--profiles", default=str(DEFAULT_PROFILES), metavar="DIR",
                   help="calibration profiles of catalog devices")
    p.add_argument("--profile", action="append", metavar="JSON",
                   help="the device of groups without an `accelerator`; repeat it for several "
                        "TP degrees, each group using the one of its TP (default: this "
                        "project's CPU profiles, TP 1 and 2)")
    p.add_argument("--kv-link", type=_positive_float, default=1.0e9, metavar="BYTES_PER_S",
                   help="KV hand-off bandwidth between groups without an accelerator")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _model(args, deployment):
    from jaxpd.model.checkpoint import load_config
    from jaxpd.placement.deploy_yaml import CHECKPOINT
    from jaxpd.placement.place_cli import _model as preset_or_folder

    if args.model:
        args.dtype = deployment.model.dtype or "bfloat16"
        return preset_or_folder(args).replace(weight_dtype=deployment.model.weight_dtype)
    checkpoint = deployment.model.checkpoint
    if checkpoint == CHECKPOINT:
        raise UsageError(f"--model: the config's model.checkpoint is the placeholder "
                         f"{CHECKPOINT}; name the model (a preset such as llama3-8b, or a folder)")
    try:
        config = load_config(checkpoint)
    except (OSError, ValueError) as e:
        raise UsageError(f"model.checkpoint: cannot read {checkpoint!r} ({e}); or pass --model")
    return config.replace(dtype=deployment.model.dtype or config.dtype,
                          weight_dtype=deployment.model.weight_dtype)


def sim_of_config(deployment, model, *, profiles: str, profile: str | list[str],
                  kv_link: float):
    """The SimDeployment of a DeploymentConfig (see the module docstring)."""
    import dataclasses

    from jaxpd.placement.catalog import load_catalog
    from jaxpd.placement.cost_model import Profile, calibrate
    from jaxpd.placement.place import engine_buckets, sim_deployment
    from jaxpd.placement.place_cli import _calibrated
    from jaxpd.placement.placer import Option, Plan, PoolSpec

    catalog = load_catalog()
    # TP -> (roof, efficiency, slowdown beside a decoding process) of the profile taken at it
    measured: dict[int, tuple] = {}
    paths = [profile] if isinstance(profile, str) else list(profile or DEFAULT_PROFILE)

    def measured_at(tp: int) -> tuple:
        if not measured:
            for path in paths:
                try:
                    loaded = Profile.load(path)
                except (OSError, ValueError, KeyError) as e:
                    raise UsageError(f"--profile: cannot read {path!r} ({e})") from None
                measured.setdefault(loaded.tp, (loaded.roof, calibrate(loaded),
                                                loaded.neighbour_slowdown))
        return measured.get(tp) or next(iter(measured.values()))
    groups = [(role, deployment.group_key(role, i), group) for role in deployment.roles
              for i, group in enumerate(deployment.groups(role))]
    pools: dict[str, PoolSpec] = {}
    placed = []
    for role, key, group in groups:
        kind = group.accelerator
        devices = group.tp * group.replicas
        if kind is not None:
            if kind not in catalog:
                raise UsageError(f"{key}.accelerator: {kind!r} is not in the catalog "
                                 f"({', '.join(sorted(catalog))})")
            spec = catalog[kind]
            one_host = group.hosts == 1
            name = f"{kind}@{group.host}" if one_host else f"{key}:{kind}"
            pool = PoolSpec(name=name, device=kind, vendor=spec.vendor, count=devices,
                            price_per_device_hour=spec.price_per_hour, roof=spec.roof(),
                            max_tp=spec.max_tp, network_bandwidth=spec.network_bandwidth,
                            devices_per_host=spec.devices_per_host,
                            max_slice_tp=spec.max_slice_tp or spec.max_tp)
        else:
            roof, efficiency, _ = measured_at(group.tp)
            name = (f"profile-tp{group.tp}@{group.host}" if group.hosts == 1
                    else f"{key}:profile")
            pool = PoolSpec(name=name, device="profile", vendor="cpu", count=devices,
                            price_per_device_hour=0.0, roof=roof, max_tp=64,  # host devices
                            network_bandwidth=kv_link / max(group.tp, 1),
                            efficiency=efficiency)
        if name in pools:  # groups on one host of one kind: one pool
            pool = dataclasses.replace(pool, count=pools[name].count + devices)
        pools[name] = pool
        placed.append((role, group, name))
    calibrated, _ = _calibrated([p for p in pools.values() if p.device != "profile"], profiles)
    pools.update({p.name: p for p in calibrated})
    sched, page = deployment.scheduler, deployment.kv.page_size

    def option(role: str, group, name: str) -> Option:
        """The group as a plan option; its capacity is its routing weight, which is what
        sim_deployment shares requests by (the placer writes capacities as weights)."""
        pages = group.num_pages or deployment.kv.num_pages
        return Option(role, name, group.tp, group.weight, 0.0, "",
                      group.max_decode_batch or sched.max_decode_batch, pages * page)
    plan = Plan(tuple((option(role, group, name), group.replicas)
                      for role, group, name in placed))
    dep = sim_deployment(model, plan, pools, deployment.serving.transport)
    serving = deployment.serving
    # prefill and decode on host devices of one machine share its cores: the prefill
    # profile's slowdown beside a decoding process applies
    every = [g for _, _, g in groups]
    shared = (deployment.mode == "disaggregated" and all(
        g.accelerator is None and g.hosts == 1 and g.host == every[0].host for g in every))
    slowdown = measured_at(deployment.prefill[0].tp)[2] if shared else 1.0
    widest = sched.model_copy(update={"max_decode_batch": max(  # buckets reach every group's
        o.batch for o, _ in plan.kv_holders)})
    return dataclasses.replace(dep, max_prefill_tokens=sched.max_prefill_tokens,
                               chunk_size=sched.chunk_size, **engine_buckets(widest),
                               decode_steps_per_dispatch=sched.decode_steps_per_dispatch,
                               shared_host_slowdown=slowdown, max_queued=serving.max_queued,
                               reserve_between_calls=not serving.reserve_while_decoding,
                               queue_timeout_s=serving.queue_timeout_s)


def run(args) -> int:
    from jaxpd.config import load_config
    from jaxpd.errors import ConfigError
    from jaxpd.placement.simulator import goodput, simulate
    from jaxpd.placement.cost_model import CalibrationError
    from jaxpd.placement.workload import TraceError

    try:
        deployment = load_config(args.config)
        model = _model(args, deployment)
        workload = _workload(args)
        slo = _slos(args) if args.slo else None
        if args.requests < 1:
            raise UsageError(f"--requests must be at least 1, got {args.requests}")
        dep = sim_of_config(deployment, model, profiles=args.profiles, profile=args.profile,
                            kv_link=args.kv_link)
    except (UsageError, TraceError, CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    requests = workload.requests(args.rate, args.requests, args.seed)
    result = simulate(dep, requests)
    q = slo.percentile if slo is not None else 90.0
    out = {"config": args.config, "workload": args.workload, "rate": args.rate,
           "requests": len(requests), "seed": args.seed, "mode": deployment.mode,
           f"ttft_p{q:g}": result.percentile("ttft", q),
           f"tpot_p{q:g}": result.percentile("tpot", q),
           "ttft_p50": result.percentile("ttft", 50), "tpot_p50": result.percentile("tpot", 50),
           "dropped": result.dropped, "rejected": result.rejected, "attainment": None,
           "goodput": None}
    if slo is not None:
        out["attainment"] = result.attainment(slo.ttft, slo.tpot)
        out["slo"] = {f"ttft_p{q:g}": slo.ttft, f"tpot_p{q:g}": slo.tpot,
                      "attainment": slo.target}
        out["meets_slo"] = bool(out["attainment"] >= slo.target)
        out["goodput"] = goodput(dep, lambda r: workload.requests(r, args.requests, args.seed),
                                 slo.ttft, slo.tpot, slo.target, start_rate=args.rate,
                                 rel_tol=0.02)
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in out.items()}))
        return 0
    print(f"{deployment.mode} deployment {Path(args.config).name}: {args.workload} at "
          f"{args.rate:g} req/s, {len(requests)} requests (seed {args.seed})")
    print(f"  TTFT p50 {out['ttft_p50']:.3g} s, p{q:g} {out[f'ttft_p{q:g}']:.3g} s;  "
          f"TPOT p50 {out['tpot_p50'] * 1e3:.3g} ms, p{q:g} {out[f'tpot_p{q:g}'] * 1e3:.3g} ms")
    if slo is not None:
        verdict = "meets" if out["meets_slo"] else "misses"
        print(f"  {out['attainment']:.1%} of requests meet both SLOs: {verdict} the "
              f"{slo.target:.0%} target; goodput {out['goodput']:.3g} req/s")
    if result.rejected:
        print(f"  {result.rejected} requests refused by the router (its queue full, or the "
              f"wait past serving.queue_timeout_s)")
    if result.dropped > result.rejected:
        print(f"  {result.dropped - result.rejected} requests never fit one replica's KV")
    return 0
