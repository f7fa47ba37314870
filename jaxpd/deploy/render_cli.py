"""`jaxpd deploy render`: Kubernetes manifests for a deployment config.

    jaxpd deploy render --config deploy.yaml --target kubernetes --image IMAGE --out k8s/
    kubectl apply -f k8s/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
examples:
  jaxpd deploy render --config configs/k8s/h100-node.yaml --target kubernetes \\
      --image ghcr.io/you/jaxpd:0.1 --out k8s/
  jaxpd deploy render --config deploy.yaml --target kubernetes --image IMAGE --namespace llm \\
      > manifests.yaml

Writes, in apply order: a Secret (the deployment's internal secret; or --internal-secret NAME
to use one you manage), a ConfigMap with the config as pods read it, per worker group a
headless Service and a StatefulSet (one host per replica) or a LeaderWorkerSet (hosts > 1; the
LeaderWorkerSet controller must be installed), and the router's Deployment, Service and
PodDisruptionBudget. With --out, one file per object, numbered in apply order. See
docs/deploy.md."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "deploy", help="turn a deployment config into cluster manifests",
        description="Turn a deployment config into what a cluster runs.")
    sub = p.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    r = sub.add_parser("render", help="write Kubernetes manifests for a deployment config",
                       description="Write Kubernetes manifests for every process a deployment "
                                   "config describes.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--config", required=True, metavar="YAML", help="deployment config (the one "
                   "`jaxpd serve` and `jaxpd place --out` use)")
    r.add_argument("--target", required=True, choices=("kubernetes",), help="what to render for")
    r.add_argument("--image", required=True, metavar="IMAGE",
                   help="container image with jaxpd installed (its `jaxpd` command is run)")
    r.add_argument("--namespace", metavar="NS", help="namespace of every object (default: "
                   "kubectl's current one)")
    r.add_argument("--name", default="jaxpd", metavar="NAME",
                   help="prefix of every object's name (default jaxpd)")
    r.add_argument("--internal-secret", metavar="SECRET",
                   help="an existing Secret (key `secret`) holding the internal secret, instead "
                        "of rendering one with a fresh random value")
    r.add_argument("--out", metavar="DIR", help="write one file per object here (default: one "
                   "YAML stream on stdout)")


def run(args) -> int:
    from jaxpd.config import load_config
    from jaxpd.deploy import kubernetes, lws

    deployment = load_config(args.config)
    objects = kubernetes.render(deployment, image=args.image, name=args.name,
                                namespace=args.namespace, internal_secret=args.internal_secret)
    for obj in objects:
        if obj["kind"] == "LeaderWorkerSet":
            lws.check(obj)
    if args.out is None:
        sys.stdout.write(kubernetes.to_yaml(objects))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, obj in enumerate(objects):
        path = out / f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(kubernetes.to_yaml([obj]))
    print(f"wrote {len(objects)} manifests to {out}/ "
          f"({', '.join(sorted({o['kind'] for o in objects}))}); apply with: kubectl apply -f "
          f"{out}/", file=sys.stderr)
    return 0
