"""`jaxpd place`: which devices serve prefill and decode, with what TP and how many replicas.

    jaxpd place --inventory configs/inventory/mixed-gpu.yaml --model llama3-8b \\
        --workload chatbot --rate 100 --slo ttft_p90=0.25 --slo tpot_p90=0.03 --out deploy.yaml

Exit status: 0 with a plan; 1 when no plan meets the SLOs (one line says which SLO is out of
reach and the best attainable figure); 2 for bad input (a line naming the flag or YAML key).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from jaxpd.cli_types import positive_int

EXIT_UNREACHABLE, EXIT_USAGE = 1, 2
WORKLOADS = ("chatbot", "code", "summarization")
DEFAULT_PROFILES = Path(__file__).resolve().parents[2] / "configs" / "profiles"

EPILOG = """\
examples:
  jaxpd place --inventory configs/inventory/mixed-gpu.yaml --model llama3-8b --workload chatbot \\
      --rate 100 --slo ttft_p90=0.25 --slo tpot_p90=0.03
  jaxpd place --inventory configs/inventory/gpu-and-tpu.yaml --model ./Llama-3.1-8B \\
      --isl 2000 --osl 200 --rate 20 --slo ttft_p90=1 --slo tpot_p90=0.05 --json
  jaxpd place ... --objective goodput-per-dollar --budget 40 --out deploy.yaml

An inventory is YAML: `pools:` a list of {name, device, count, price_per_hour (optional)}, with
`device` a file of configs/hardware/ (h100-sxm, h200, a100-80gb, l4, l40s, tpu-v5e, tpu-v5p,
tpu-v6e). Leading plans are replayed in a discrete-event simulator against the whole length
distribution before one is chosen; `--out` writes it as a config `jaxpd serve` accepts."""


class UsageError(ValueError):
    """Bad flags or files: exit 2 with the message."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def _model_volume(text: str) -> dict:
    kind, sep, value = text.partition(":")
    if not sep or not value or kind not in ("claim", "host"):
        raise argparse.ArgumentTypeError(f"expected claim:PVC_NAME or host:/dir, got {text!r}")
    return {"claim": value} if kind == "claim" else {"host_path": value}


_SLO = re.compile(r"^(ttft|tpot)_p(\d+(?:\.\d+)?)=(.+)$")


def _slo(text: str) -> tuple[str, float, float]:
    m = _SLO.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected ttft_pNN=SECONDS or tpot_pNN=SECONDS (e.g. ttft_p90=0.25), got {text!r}")
    percentile = float(m.group(2))
    if not 0 < percentile < 100:
        raise argparse.ArgumentTypeError(f"percentile must be in (0, 100), got {m.group(2)}")
    return m.group(1), percentile, _positive_float(m.group(3))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "place", help="choose devices, TP and replicas for prefill and decode at the lowest cost",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Choose, from an inventory of device pools, which pool serves prefill and "
                    "which decode (or both, colocated), at what TP degree and with how many "
                    "replicas, to meet TTFT/TPOT SLOs at the lowest $/hour (or the most goodput "
                    "per dollar).")
    p.add_argument("--inventory", required=True, metavar="YAML", help="the device pools")
    p.add_argument("--model", required=True, metavar="PRESET|DIR",
                   help="a preset (llama3-8b, llama3-70b, qwen2.5-7b, mistral-7b, ...) or a "
                        "Hugging Face folder with config.json")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "fp8"],
                   default="bfloat16",
                   help="serving dtype (default bfloat16); fp8 = FP8 weights (one byte each, "
                        "a scale per row) with bfloat16 compute, as jaxpd serves them "
                        "(model.weight_dtype: float8_e4m3fn): half the weight bytes decode "
                        "streams, at bf16's FLOP/s")
    p.add_argument("--workload", default="chatbot", metavar="KIND|FILE",
                   help="chatbot, code or summarization (DistServe's length distributions), or a "
                        "JSONL/CSV trace with arrival_s, prompt_tokens, output_tokens "
                        "(default chatbot)")
    p.add_argument("--isl", type=positive_int, metavar="N", help="fixed prompt length (tokens)")
    p.add_argument("--osl", type=positive_int, metavar="N", help="fixed output length (tokens)")
    p.add_argument("--rate", required=True, type=_positive_float, metavar="R",
                   help="requests per second to serve (Poisson arrivals; a trace is rescaled)")
    p.add_argument("--slo", action="append", type=_slo, default=[], metavar="METRIC=S",
                   help="ttft_p90=SECONDS and tpot_p90=SECONDS (both needed; same percentile)")
    p.add_argument("--attainment", type=float, metavar="F",
                   help="share of requests that must meet both SLOs (default: the percentile)")
    p.add_argument("--objective", choices=["cost", "goodput-per-dollar"], default="cost",
                   help="cost: cheapest plan at --rate (default); goodput-per-dollar: most "
                        "requests/s per $ carrying at least --rate, within --budget")
    p.add_argument("--budget", type=_positive_float, metavar="USD",
                   help="most $/hour the plan may cost")
    p.add_argument("--candidates", type=positive_int, default=5, metavar="N",
                   help="leading plans to verify in the simulator (default 5)")
    p.add_argument("--options-per-role", type=positive_int, default=2, metavar="N",
                   help="pools (or TP degrees) one role may run on at once, e.g. decode on "
                        "v5e and v6e together, each group weighted by its capacity (default "
                        "2; 1 = one kind per role)")
    p.add_argument("--profiles", default=str(DEFAULT_PROFILES), metavar="DIR",
                   help="tools/bench_engine.py profiles; a device with one gets calibrated "
                        "efficiencies (default configs/profiles)")
    p.add_argument("--model-volume", type=_model_volume, metavar="claim:PVC|host:DIR",
                   help="--out for Kubernetes: the volume holding the weights (a "
                        "PersistentVolumeClaim or a node directory), mounted at /models; "
                        "--checkpoint then names the folder under /models")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="checkpoint path written into --out (default: --model when a folder)")
    p.add_argument("--max-utilization", type=_fraction, default=0.8, metavar="F",
                   help="load no replica past this share of what it sustains (headroom; "
                        "default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PNG",
                   help="draw the ranked plans' $/hour against their goodput (the chosen one "
                        "marked); needs matplotlib (pip install 'jaxpd[plot]')")
    p.add_argument("--out", metavar="YAML", help="write the chosen plan as a deployment config")


# -- inputs ---------------------------------------------------------------------------------------
def _model(args):
    from jaxpd.model.presets import PRESETS, get_preset

    folder = Path(args.model)
    if (folder / "config.json").is_file():
        from jaxpd.model.hf_config import load_hf_config

        cfg = load_hf_config(folder)
    elif args.model in PRESETS:
        cfg = get_preset(args.model)
    else:
        raise UsageError(f"--model: {args.model!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor a folder with config.json")
    if args.dtype == "fp8":
        return cfg.replace(dtype="bfloat16", weight_dtype="float8_e4m3fn")
    return cfg.replace(dtype=args.dtype)


def _workload(args):
    from jaxpd.placement.place import Workload

    if args.workload in WORKLOADS:  # --isl/--osl fix either length of the distribution
        return Workload(args.workload, isl=args.isl, osl=args.osl)
    if args.workload == "fixed":
        if not (args.isl and args.osl):
            raise UsageError("--workload fixed needs both --isl and --osl")
        return Workload("fixed", isl=args.isl, osl=args.osl)
    if not Path(args.workload).is_file():
        raise UsageError(f"--workload: {args.workload!r} is not one of {', '.join(WORKLOADS)} "
                         f"and no such trace file exists")
    if args.isl or args.osl:
        raise UsageError("--isl/--osl fix lengths of a named workload; a trace has its own")
    return Workload.from_trace(args.workload)


def _slos(args):
    from jaxpd.placement.place import Slo

    given = {metric: (pct, seconds) for metric, pct, seconds in args.slo}
    missing = [m for m in ("ttft", "tpot") if m not in given]
    if missing:
        raise UsageError(f"--slo: give {' and '.join(f'{m}_p90=SECONDS' for m in missing)}")
    if given["ttft"][0] != given["tpot"][0]:
        raise UsageError("--slo: ttft and tpot must be at the same percentile")
    if args.attainment is not None and not 0 < args.attainment <= 1:
        raise UsageError(f"--attainment must be in (0, 1], got {args.attainment}")
    return Slo(given["ttft"][1], given["tpot"][1], given["ttft"][0], args.attainment)


def _calibrated(pools, profiles_dir: str):
    """Pools whose device has a profile get the efficiencies fitted to it."""
    import dataclasses

    from jaxpd.placement.cost_model import Profile, calibrate

    directory = Path(profiles_dir)
    if not directory.is_dir():
        return pools, []
    fitted, used = {}, []
    for path in sorted(directory.glob("*.json")):
        key = json.loads(path.read_text()).get("device_key")
        if key in {p.device for p in pools} and key not in fitted:
            fitted[key] = calibrate(Profile.load(path))
            used.append(str(path))
    return [dataclasses.replace(p, efficiency=fitted.get(p.device, p.efficiency))
            for p in pools], used


# -- output ---------------------------------------------------------------------------------------
def _role(plan, role: str, pools) -> dict | None:
    """A role's replicas in all and its groups (pool, device, TP, replicas, requests/s one
    replica carries: the YAML's weight); with one group, its pool, device and TP too."""
    found = plan.roles(role)
    if not found:
        return None
    groups = [{"pool": o.pool, "device": pools[o.pool].device, "tp": o.tp, "replicas": n,
               "capacity": round(o.capacity, 4)} for o, n in found]
    out = {"replicas": sum(n for _, n in found), "groups": groups}
    if len(groups) == 1:
        out.update({k: groups[0][k] for k in ("pool", "device", "tp")})
    return out


def summary(placement, pools, objective: str) -> dict:
    """The JSON object `--json` prints."""
    p = f"p{placement.slo.percentile:g}"
    d = placement.demand
    out: dict = {"objective": objective, "rate": d.rate,
                 "demand": {"isl_mean": round(d.isl_mean, 1), f"isl_{p}": d.isl_p90,
                            "osl_mean": round(d.osl_mean, 1)},
                 "slo": {f"ttft_{p}": placement.slo.ttft, f"tpot_{p}": placement.slo.tpot,
                         "attainment": placement.slo.target}}
    best = placement.best
    if best is not None:
        plan = best.plan
        out.update({
            "cost_per_hour": round(best.cost_per_hour, 4), "colocated": plan.colocated,
            "prefill": _role(plan, "colocated" if plan.colocated else "prefill", pools),
            "decode": _role(plan, "colocated" if plan.colocated else "decode", pools),
            "kv_transport": best.transport, f"ttft_{p}": best.ttft, f"tpot_{p}": best.tpot,
            "goodput": placement.goodput, "slo_attainment": best.attainment,
            "devices": plan.devices})
    out["single_kind_cost_per_hour"] = placement.single_kind
    out["candidates"] = [{"plan": c.plan.describe(), "cost_per_hour": round(c.cost_per_hour, 4),
                          "verified": c.verified, f"ttft_{p}": c.ttft, f"tpot_{p}": c.tpot,
                          "slo_attainment": c.attainment, "kv_transport": c.transport,
                          "why": why(c), "simulation": list(c.notes)}
                         for c in placement.candidates]
    if placement.unreachable:
        out["unreachable"] = placement.unreachable
    return out


def plot_plans(placement, path: str) -> None:
    """Cost against the capacity each ranked plan carries within the SLOs (the analytic
    figure; the chosen plan's point is its simulated goodput), verified plans filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    best = placement.best
    for c in placement.candidates:
        chosen = c is best
        x = placement.goodput if chosen and placement.goodput == placement.goodput \
            else c.plan.capacity
        ax.scatter([x], [c.cost_per_hour], s=90 if chosen else 40,
                   marker="*" if chosen else "o",
                   facecolors=("tab:red" if chosen else "tab:blue") if c.verified else "none",
                   edgecolors="tab:red" if chosen else "tab:blue", zorder=3)
        ax.annotate(c.plan.describe(), (x, c.cost_per_hour), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.axvline(placement.demand.rate, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("requests/s within the SLOs (chosen plan: simulated goodput)")
    ax.set_ylabel("$/hour")
    slo = placement.slo
    ax.set_title(f"{placement.demand.rate:g} req/s, TTFT p{slo.percentile:g} <= {slo.ttft:g} s, "
                 f"TPOT p{slo.percentile:g} <= {slo.tpot:g} s (filled: verified)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def why(candidate) -> str:
    """What bounds each role of the plan, from the cost model's notes."""
    parts = [f"{o.role} on {o.pool} TP{o.tp}: {o.note}" for o, _ in candidate.plan.choices]
    if candidate.transport:
        where = "one host" if candidate.transport == "shm" else "between hosts"
        parts.append(f"KV over {candidate.transport} ({where}) at "
                     f"{candidate.kv_link_bytes_s / 1e9:.3g} GB/s")
    return "; ".join(parts)


def _table(placement, pools) -> None:
    from rich.console import Console
    from rich.table import Table

    if not placement.candidates:
        return
    p = f"p{placement.slo.percentile:g}"
    table = Table(title="Plans, replayed in the simulator (best verified first)")
    for col in ("#", "plan", "$/hour", f"TTFT {p}", f"TPOT {p}", "attain", "SLOs", "KV"):
        table.add_column(col, overflow="fold")
    for i, c in enumerate(placement.candidates, 1):
        table.add_row(str(i), c.plan.describe(), f"{c.cost_per_hour:.2f}",
                      f"{c.ttft * 1e3:.0f} ms", f"{c.tpot * 1e3:.1f} ms", f"{c.attainment:.1%}",
                      "met" if c.verified else "missed", c.transport or "local")
    console = Console()
    console.print(table)
    for i, c in enumerate(placement.candidates[:3], 1):
        console.print(f"[bold]#{i}[/bold] {why(c)}", highlight=False)
        for note in c.notes:
            console.print(f"    {note}", highlight=False)
    best = placement.best
    if best is None:
        return
    line = f"best: {best.plan.describe()} at ${best.cost_per_hour:.2f}/hour, goodput " \
           f"{placement.goodput:.3g} req/s"
    kinds = {pools[o.pool].device for o, _ in best.plan.choices}
    others = {k: v for k, v in placement.single_kind.items() if len(kinds) > 1 or k not in kinds}
    if others:
        kind, cost = min(others.items(), key=lambda kv: kv[1])
        label = "the best single-kind plan" if len(kinds) > 1 else "the best plan on another kind"
        if best.cost_per_hour < cost:
            line += f"; {1 - best.cost_per_hour / cost:.0%} cheaper than {label} " \
                    f"({kind}, ${cost:.2f}/hour)"
    console.print(line)


def run(args) -> int:
    from jaxpd.placement.catalog import CatalogError, load_inventory
    from jaxpd.placement.cost_model import CalibrationError
    from jaxpd.placement.deploy_yaml import plan_yaml
    from jaxpd.placement.place import place
    from jaxpd.placement.workload import TraceError

    try:
        model = _model(args)
        workload = _workload(args)
        slo = _slos(args)
        pools, _ = _calibrated(load_inventory(args.inventory), args.profiles)
    except (UsageError, CatalogError, TraceError, CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # a broken HF config.json
        print(f"error: --model: {e}", file=sys.stderr)
        return EXIT_USAGE
    placement = place(model, pools, workload, args.rate, slo, objective=args.objective,
                      budget=args.budget, candidates=args.candidates, seed=args.seed,
                      max_utilization=args.max_utilization,
                      max_per_role=args.options_per_role)
    by_name = {p.name: p for p in pools}
    if args.json:
        print(json.dumps(summary(placement, by_name, args.objective)))
    else:
        _table(placement, by_name)
    if args.plot:
        try:
            plot_plans(placement, args.plot)
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'jaxpd[plot]'", file=sys.stderr)
            return EXIT_USAGE
        if not args.json:
            print(f"drew {args.plot}")
    if placement.best is None:
        print(f"error: {placement.unreachable}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.out:
        checkpoint = args.checkpoint or (args.model if Path(args.model).is_dir() else None)
        if args.model_volume and not (checkpoint or "").startswith("/models/"):
            checkpoint = f"/models/{Path(checkpoint or args.model).name}"  # as pods see it
        Path(args.out).write_text(plan_yaml(placement.best.plan, checkpoint=checkpoint,
                                            dtype=model.dtype, pools=by_name,
                                            weight_dtype=model.weight_dtype,
                                            model_volume=args.model_volume))
        if not args.json:
            print(f"wrote {args.out}")
    return 0
