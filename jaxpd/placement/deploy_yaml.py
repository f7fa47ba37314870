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

from jaxpd.config import DeploymentConfig, groups_as_written, parse_config
from jaxpd.placement.placer import Option, Plan, PoolSpec, kv_link

CHECKPOINT = "MODEL_CHECKPOINT_DIR"  # written when the plan was made for a preset, not a folder
MAX_PAGES = 1 << 20
# A disaggregated prefill worker has no decode to interleave with, so it prefills whole
# prompts up to the step budget: 256-token chunks would re-read the weights every 256 tokens
# (an 8B model's 16 GB per chunk on an L4, 53 ms), a third more prefill time for long prompts.
DISAGGREGATED_CHUNK = 2048  # = the scheduler's default max_prefill_tokens


def _kv_holder(plan: Plan) -> Option:
    """The KV-holding option with the largest decode batch (the scheduler's limit; smaller
    ones are written on their groups)."""
    return max((o for o, _ in plan.kv_holders), key=lambda o: o.batch)


def plan_scheduler(plan: Plan) -> dict:
    """The `scheduler` section the plan's YAML writes (the rest at the engine's defaults):
    the simulator that verifies the plan reads the same one."""
    section = {"max_decode_batch": max(_kv_holder(plan).batch, 1)}
    if not plan.colocated:
        section["chunk_size"] = DISAGGREGATED_CHUNK
    return section


def _pages(option: Option, page_size: int) -> int:
    """KV pages of what one replica holds after its weights."""
    if not option.kv_tokens:
        return 4096
    return min(MAX_PAGES, max(option.kv_tokens // page_size, 64))


def plan_config(plan: Plan, *, checkpoint: str | None, pools: Mapping[str, PoolSpec],
                dtype: str = "bfloat16", page_size: int = 16, router_port: int = 50051,
                model_volume: dict | None = None,
                weight_dtype: str | None = None) -> DeploymentConfig:
    """The DeploymentConfig for `plan` (raises ConfigError if the plan cannot be expressed):
    KV pages sized to what the decode devices hold after their weights, and the decode batch
    limited to the largest whose step the cost model fits in the TPOT SLO. `pools` (by name)
    give each group its accelerator, hosts, topology and node labels; `model_volume` becomes
    `kubernetes.model_volume`. A role on several options becomes a list of groups, each
    weighted by what one of its replicas carries (the router shares requests accordingly),
    with its own KV pages and decode batch where they differ from the first's."""
    holder = _kv_holder(plan)
    data: dict = {"model": {"checkpoint": checkpoint or CHECKPOINT, "dtype": dtype,
                            **({"weight_dtype": weight_dtype} if weight_dtype else {})},
                  "kv": {"page_size": page_size, "num_pages": _pages(holder, page_size)},
                  "serving": {"router": {"host": "0.0.0.0", "port": router_port}}}
    data["scheduler"] = plan_scheduler(plan)
    if model_volume is not None:
        data["kubernetes"] = {"model_volume": model_volume}
    used: dict[str, int] = {}  # devices taken on each pool (one machine can run several groups)
    port = [50061]  # the next free worker port: groups never share one

    def groups(role: str) -> list[dict]:
        chosen = plan.roles(role)
        out = []
        for option, replicas in chosen:
            pool = pools[option.pool]
            start = used.get(option.pool, 0) if pool.hosts(option.tp) == 1 else 0
            group = _group(option, replicas, pool, start=start, port=port[0])
            port[0] += replicas
            used[option.pool] = start + option.tp * replicas
            if len(chosen) > 1:
                group["weight"] = round(option.capacity, 4)
            if option.role != "prefill":
                pages, batch = _pages(option, page_size), max(option.batch, 1)
                if pages != data["kv"]["num_pages"]:
                    group["num_pages"] = pages
                if batch != data["scheduler"]["max_decode_batch"]:
                    group["max_decode_batch"] = batch
            out.append(group)
        return out

    if plan.colocated:
        data["mode"] = "colocated"
        data["prefill"] = groups("colocated")
    else:
        data["mode"] = "disaggregated"
        data["prefill"] = groups("prefill")
        port[0] = max(port[0], 50081)
        data["decode"] = groups("decode")
        data["serving"]["transport"] = plan_transport(plan, pools)  # what the placer priced
    return parse_config(groups_as_written(data), "<placement plan>")


def plan_transport(plan: Plan, pools: Mapping[str, PoolSpec]) -> str:
    """The one `serving.transport` of a disaggregated plan: shared memory only when every
    prefill group reaches every decode group on one host, else the tcp data plane."""
    chosen = {kv_link(p, d, pools)[1] for p, _ in plan.roles("prefill")
              for d, _ in plan.roles("decode")}
    return chosen.pop() if len(chosen) == 1 else "tcp"


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
    data = groups_as_written(cfg.model_dump(mode="json", exclude_defaults=True))
    return header + yaml.safe_dump(data, sort_keys=False)
