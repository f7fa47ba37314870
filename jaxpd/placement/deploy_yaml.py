"""A placement plan as the deployment YAML `jaxpd serve` reads (validated by the same config type).

Each group's replicas take consecutive device indices (replica i: devices[i*tp:(i+1)*tp]), which
is how `jaxpd serve` starts them on one host. A group larger than one host is started role by
role (`jaxpd serve prefill --replica I` on each host), with the indices read on that host.
"""

from __future__ import annotations

import yaml

from jaxpd.config import DeploymentConfig, parse_config
from jaxpd.placement.placer import Option, Plan

PREFILL_HOST, DECODE_HOST = "PREFILL_POOL_HOST", "DECODE_POOL_HOST"
CHECKPOINT = "MODEL_CHECKPOINT_DIR"  # written when the plan was made for a preset, not a folder
MAX_PAGES = 1 << 20


def _kv_holder(plan: Plan) -> Option:
    return plan.choices[0][0] if plan.colocated else plan.role("decode")[0]


def plan_config(plan: Plan, *, checkpoint: str | None, dtype: str = "bfloat16",
                page_size: int = 16, router_port: int = 50051) -> DeploymentConfig:
    """The DeploymentConfig for `plan` (raises ConfigError if the plan cannot be expressed):
    KV pages sized to what the decode devices hold after their weights, and the decode batch
    limited to the largest whose step the cost model fits in the TPOT SLO."""
    holder = _kv_holder(plan)
    num_pages = min(MAX_PAGES, max(holder.kv_tokens // page_size, 64)) if holder.kv_tokens \
        else 4096
    data: dict = {"model": {"checkpoint": checkpoint or CHECKPOINT, "dtype": dtype},
                  "kv": {"page_size": page_size, "num_pages": num_pages},
                  "serving": {"router": {"host": "0.0.0.0", "port": router_port}}}
    if holder.batch:
        data["scheduler"] = {"max_decode_batch": holder.batch}
    if plan.colocated:
        option, replicas = plan.choices[0]
        data["mode"] = "colocated"
        data["prefill"] = _group(option.tp, replicas, start=0, port=50061)
    else:
        (pre, n_pre), (dec, n_dec) = plan.role("prefill"), plan.role("decode")
        same_pool = pre.pool == dec.pool  # then decode takes the devices after prefill's
        data["mode"] = "disaggregated"
        data["prefill"] = _group(pre.tp, n_pre, start=0, port=50061)
        data["decode"] = _group(dec.tp, n_dec, start=pre.tp * n_pre if same_pool else 0,
                                port=50081)
        if not same_pool:  # other machines: name them before `jaxpd serve ROLE` runs there
            data["prefill"]["host"], data["decode"]["host"] = PREFILL_HOST, DECODE_HOST
    return parse_config(data, "<placement plan>")


def _group(tp: int, replicas: int, *, start: int, port: int) -> dict:
    return {"devices": list(range(start, start + tp * replicas)), "tp": tp, "replicas": replicas,
            "host": "0.0.0.0", "port": port}


def plan_yaml(plan: Plan, **kwargs) -> str:
    cfg = plan_config(plan, **kwargs)
    header = "# Written by `jaxpd place`: " + ", ".join(
        f"{o.role} {n} x {o.pool} TP={o.tp}" for o, n in plan.choices) + \
        f"; ${plan.cost_per_hour:.2f}/hour\n"
    if cfg.model.checkpoint == CHECKPOINT:
        header += f"# Replace {CHECKPOINT} with the model's folder (HF or orbax).\n"
    if cfg.mode == "disaggregated" and cfg.prefill.host == PREFILL_HOST:
        header += (f"# Prefill and decode run on different machines: replace {PREFILL_HOST} and "
                   f"{DECODE_HOST},\n# then run `jaxpd serve prefill|decode --replica I` on "
                   f"each and `jaxpd serve router`.\n")
    return header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
