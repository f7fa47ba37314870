"""A placement plan as the deployment YAML `jaxpd serve` and `jaxpd deploy render` read
(validated by the same config type).

Each group says what it runs on (`accelerator`, the pool's catalog key; `topology`, the TPU
slice shape; `node_selector`, the pool's Kubernetes node labels). A replica within one host
takes consecutive device indices (replica i: devices[i*tp:(i+1)*tp]), which is how `jaxpd
serve` starts them on one machine; a TP wider than a host becomes a multi-host group (`hosts`
processes, each on its host's `devices`). `jaxpd deploy render --target kubernetes` turns the
file into manifests; the model's volume (`kubernetes.model_volume`) comes from
`jaxpd place --model-volume`.
"""

from __future__ import annotations

import yaml

from typing import Mapping

from jaxpd.config import DeploymentConfig, parse_config
from jaxpd.placement.placer import Option, Plan, PoolSpec, kv_link

CHECKPOINT = "MODEL_CHECKPOINT_DIR"  # written when the plan was made for a preset, not a folder
MAX_PAGES = 1 << 20
# A disaggregated prefill worker has no decode to interleave with, so it prefills whole
# prompts up to the step budget: 256-token chunks would re-read the weights every 256 tokens
# (an 8B model's 16 GB per chunk on an L4, 53 ms), a third more prefill time for long prompts.
DISAGGREGATED_CHUNK = 2048  # = the scheduler's default max_prefill_tokens


def _kv_holder(plan: Plan) -> Option:
    return plan.choices[0][0] if plan.colocated else plan.role("decode")[0]


def plan_scheduler(plan: Plan) -> dict:
    """The `scheduler` section the plan's YAML writes (the rest at the engine's defaults):
    the simulator that verifies the plan reads the same one."""
    section = {"max_decode_batch": max(_kv_holder(plan).batch, 1)}
    if not plan.colocated:
        section["chunk_size"] = DISAGGREGATED_CHUNK
    return section


def plan_config(plan: Plan, *, checkpoint: str | None, pools: Mapping[str, PoolSpec],
                dtype: str = "bfloat16", page_size: int = 16, router_port: int = 50051,
                model_volume: dict | None = None) -> DeploymentConfig:
    """The DeploymentConfig for `plan` (raises ConfigError if the plan cannot be expressed):
    KV pages sized to what the decode devices hold after their weights, and the decode batch
    limited to the largest whose step the cost model fits in the TPOT SLO. `pools` (by name)
    give each group its accelerator, hosts, topology and node labels; `model_volume` becomes
    `kubernetes.model_volume`."""
    holder = _kv_holder(plan)
    num_pages = min(MAX_PAGES, max(holder.kv_tokens // page_size, 64)) if holder.kv_tokens \
        else 4096
    data: dict = {"model": {"checkpoint": checkpoint or CHECKPOINT, "dtype": dtype},
                  "kv": {"page_size": page_size, "num_pages": num_pages},
                  "serving": {"router": {"host": "0.0.0.0", "port": router_port}}}
    data["scheduler"] = plan_scheduler(plan)
    if model_volume is not None:
        data["kubernetes"] = {"model_volume": model_volume}
    if plan.colocated:
        option, replicas = plan.choices[0]
        data["mode"] = "colocated"
        data["prefill"] = _group(option, replicas, pools[option.pool], start=0, port=50061)
    else:
        (pre, n_pre), (dec, n_dec) = plan.role("prefill"), plan.role("decode")
        # one pool: decode takes the devices after prefill's (one machine can run both)
        same_pool = pre.pool == dec.pool and _hosts(pre, pools) == _hosts(dec, pools) == 1
        data["mode"] = "disaggregated"
        data["prefill"] = _group(pre, n_pre, pools[pre.pool], start=0, port=50061)
        data["decode"] = _group(dec, n_dec, pools[dec.pool],
                                start=pre.tp * n_pre if same_pool else 0, port=50081)
        data["serving"]["transport"] = kv_link(pre, dec, pools)[1]  # what the placer priced
    return parse_config(data, "<placement plan>")


def _hosts(option: Option, pools: Mapping[str, PoolSpec]) -> int:
    return pools[option.pool].hosts(option.tp)


def _group(option: Option, replicas: int, pool: PoolSpec, *, start: int, port: int) -> dict:
    tp = option.tp
    group: dict = {"devices": list(range(start, start + tp * replicas)), "tp": tp,
                   "replicas": replicas, "host": "0.0.0.0", "port": port,
                   "accelerator": pool.device}
    hosts = pool.hosts(tp)
    if hosts > 1:  # every host of a replica uses its local devices
        group.update(hosts=hosts, devices=list(range(tp // hosts)))
    topology = pool.topology(tp)
    if topology is not None:
        group["topology"] = topology
    if pool.node_labels:
        group["node_selector"] = dict(pool.node_labels)
    return group


def plan_yaml(plan: Plan, **kwargs) -> str:
    cfg = plan_config(plan, **kwargs)
    header = "# Written by `jaxpd place`: " + ", ".join(
        f"{o.role} {n} x {o.pool} TP={o.tp}" for o, n in plan.choices) + \
        f"; ${plan.cost_per_hour:.2f}/hour\n"
    if cfg.model.checkpoint == CHECKPOINT:
        header += f"# Replace {CHECKPOINT} with the model's folder (HF or orbax).\n"
    header += ("# On Kubernetes: jaxpd deploy render --config THIS --target kubernetes --image "
               "IMAGE --out k8s/\n")
    if cfg.kubernetes.model_volume is None:
        header += ("# (first add kubernetes: {model_volume: {claim: PVC}} with the weights, or "
                   "pass --model-volume to jaxpd place)\n")
    return header + yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True),
                                   sort_keys=False)
