"""`jaxpd deploy render`: the Kubernetes manifests of the example configs and of a placer-written
file, validated with kubernetes-validate (strict, Kubernetes 1.30) and, for LeaderWorkerSets
(a CRD kubernetes-validate does not know), with the model in jaxpd/deploy/lws.py and their pod
templates as Pods."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from jaxpd.config import load_config, parse_config
from jaxpd.deploy import kubernetes, lws
from jaxpd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "configs" / "k8s").glob("*.yaml"))
K8S_VERSION = "1.30.0"
IMAGE = "ghcr.io/example/jaxpd:0.1"


def validate(objects: list[dict]) -> None:
    """Every core object against Kubernetes' schema; every LeaderWorkerSet against ours, and
    its pod templates as Pods."""
    for obj in objects:
        if obj["kind"] == "LeaderWorkerSet":
            lws.check(obj)
            for which, template in lws.pod_templates(obj).items():
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": f"{obj['metadata']['name']}-{which}",
                                    **template["metadata"]}, "spec": template["spec"]}
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def container(template: dict) -> dict:
    (c,) = template["spec"]["containers"]
    return c


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_renders_to_valid_manifests(path):
    deployment = load_config(path)
    objects = kubernetes.render(deployment, image=IMAGE, namespace="llm")
    validate(objects)
    kinds = [o["kind"] for o in objects]
    assert kinds[:2] == ["Secret", "ConfigMap"]  # what pods mount comes first
    assert kinds[-3:] == ["Deployment", "Service", "PodDisruptionBudget"]
    assert all(o["metadata"]["namespace"] == "llm" for o in objects)
    # the config pods read parses, and listens where pods are reachable
    pod_config = parse_config(yaml.safe_load(objects[1]["data"]["deploy.yaml"]))
    assert pod_config.serving.router.host == "0.0.0.0"
    assert all(g.section.host == "0.0.0.0" and g.section.port
               for g in kubernetes.groups(pod_config))
    router = by_kind(objects)[("Deployment", "jaxpd-router")]["spec"]["template"]
    args = container(router)["args"]
    for g in kubernetes.groups(deployment):
        flag = "--decode-addresses" if g.role != "prefill" else "--prefill-addresses"
        assert args[args.index(flag) + 1].split(",") == \
            kubernetes.replica_addresses("jaxpd", g)
        service = by_kind(objects)[("Service", f"jaxpd-{g.role}")]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
    assert container(router)["readinessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert router["spec"]["terminationGracePeriodSeconds"] > deployment.serving.drain_timeout_s
    assert router["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_one_h100_node_is_two_statefulsets_with_their_gpus():
    objects = by_kind(kubernetes.render(load_config(REPO / "configs/k8s/h100-node.yaml"),
                                        image=IMAGE))
    prefill = objects[("StatefulSet", "jaxpd-prefill")]["spec"]
    decode = objects[("StatefulSet", "jaxpd-decode")]["spec"]
    assert (prefill["replicas"], decode["replicas"]) == (1, 2)
    assert prefill["serviceName"] == "jaxpd-prefill"
    c = container(decode["template"])
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert c["args"][:7] == ["serve", "decode", "--config", "/etc/jaxpd/deploy.yaml",
                             "--replica", "$(JAXPD_REPLICA)", "--all-visible-devices"]
    assert env(c)["JAXPD_REPLICA"] == {"fieldRef": {
        "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    assert env(c)["JAXPD_INTERNAL_SECRET"] == {"secretKeyRef": {"name": "jaxpd-internal",
                                                                "key": "secret"}}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
    volumes = {v["name"]: v for v in decode["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "llama-weights",
                                                         "readOnly": True}
    assert c["startupProbe"]["grpc"]["port"] == 50071
    router = objects[("Deployment", "jaxpd-router")]["spec"]["template"]
    assert {"name": "http", "containerPort": 8000} in container(router)["ports"]
    assert "--http-port" in container(router)["args"]
    service_ports = objects[("Service", "jaxpd-router")]["spec"]["ports"]
    assert [p["name"] for p in service_ports] == ["grpc", "http"]


def test_a_tpu_v5e_slice_prefills_as_one_leaderworkerset_and_v6e_hosts_decode():
    objects = by_kind(kubernetes.render(
        load_config(REPO / "configs/k8s/tpu-v5e-prefill-v6e-decode.yaml"), image=IMAGE))
    group = objects[("LeaderWorkerSet", "jaxpd-prefill")]
    spec = group["spec"]
    assert group["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert spec["replicas"] == 1 and spec["leaderWorkerTemplate"]["size"] == 4
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    for which, template in lws.pod_templates(group).items():
        c = container(template)
        assert c["resources"]["limits"] == {"google.com/tpu": 4}
        assert template["spec"]["nodeSelector"] == {
            "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
            "cloud.google.com/gke-tpu-topology": "4x4"}
        assert env(c)["JAXPD_REPLICA"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"
        # only the leader serves gRPC (and is probed); the other hosts follow it
        assert ("readinessProbe" in c) == (which == "leader")
    decode = objects[("StatefulSet", "jaxpd-decode")]["spec"]["template"]
    assert container(decode)["resources"]["limits"] == {"google.com/tpu": 8}
    assert decode["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == \
        "tpu-v6e-slice"
    assert decode["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"


def test_a_placer_written_file_becomes_valid_manifests(tmp_path):
    """The placer's plan (H100 prefill, a v5e TP=16 decode over 4 hosts) -> YAML -> manifests,
    through the CLI: multi-host groups, topologies and the pools' node labels carried over."""
    from jaxpd.placement.catalog import parse_inventory
    from jaxpd.placement.deploy_yaml import plan_yaml
    from jaxpd.placement.placer import Option, Plan

    pools = {p.name: p for p in parse_inventory({"pools": [
        {"name": "h100", "device": "h100-sxm", "count": 8,
         "node_labels": {"pool": "a3-highgpu"}},
        {"name": "v5e", "device": "tpu-v5e", "count": 32,
         "node_labels": {"team": "inference"}}]}, "<test>")}
    plan = Plan(((Option("prefill", "h100", 4, 10.0, 40.0, ""), 2),
                 (Option("decode", "v5e", 16, 10.0, 19.2, "", 64, 10**6), 2)))
    path = tmp_path / "deploy.yaml"
    path.write_text(plan_yaml(plan, checkpoint="/models/llama3-70b", pools=pools,
                              model_volume={"claim": "weights"}))
    cfg = load_config(path)
    assert (cfg.decode[0].hosts, cfg.decode[0].devices, cfg.decode[0].tp) == (4, [0, 1, 2, 3], 16)
    assert (cfg.decode[0].accelerator, cfg.decode[0].topology) == ("tpu-v5e", "4x4")
    assert cfg.prefill[0].node_selector == {"pool": "a3-highgpu"} and cfg.prefill[0].topology is None
    out = tmp_path / "k8s"
    run = subprocess.run([sys.executable, "-m", "jaxpd.cli", "deploy", "render", "--config",
                          str(path), "--target", "kubernetes", "--image", IMAGE, "--out",
                          str(out)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    files = sorted(out.glob("*.yaml"))
    assert [f.name for f in files][:2] == ["00-secret-jaxpd-internal.yaml",
                                           "01-configmap-jaxpd-config.yaml"]
    objects = [yaml.safe_load(f.read_text()) for f in files]
    validate(objects)
    decode = by_kind(objects)[("LeaderWorkerSet", "jaxpd-decode")]
    assert decode["spec"]["replicas"] == 2 and decode["spec"]["leaderWorkerTemplate"]["size"] == 4
    leader = decode["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    assert leader["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4", "team": "inference"}
    prefill = by_kind(objects)[("StatefulSet", "jaxpd-prefill")]["spec"]["template"]
    assert prefill["spec"]["nodeSelector"] == {"pool": "a3-highgpu"}
    assert container(prefill)["resources"] == {"limits": {"nvidia.com/gpu": 4}}


def _base(**sections) -> dict:
    data = {"model": {"checkpoint": "/models/m"}, "mode": "disaggregated",
            "prefill": {"devices": [0], "tp": 1, "accelerator": "h100-sxm"},
            "decode": {"devices": [1], "tp": 1, "accelerator": "h100-sxm"},
            "kubernetes": {"model_volume": {"host_path": "/mnt/models"}}}
    for key, value in sections.items():
        data[key] = value
    return data


@pytest.mark.parametrize("change, message", [
    (lambda d: d["decode"].pop("accelerator"), "decode.accelerator: say what the group runs on"),
    (lambda d: d["prefill"].update(accelerator="tpu-v6e"), "prefill.topology: a TPU group"),
    (lambda d: d["model"].update(checkpoint="/data/m"),
     "model.checkpoint: /data/m is not under kubernetes.model_volume.mount (/models)"),
    (lambda d: d.pop("kubernetes"), "kubernetes.model_volume: the pods need the weights"),
])
def test_what_manifests_cannot_do_without_is_named(change, message):
    data = _base()
    change(data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kubernetes.render(parse_config(data), image=IMAGE)


def test_the_volume_is_one_claim_or_one_host_path():
    with pytest.raises(ConfigError, match="kubernetes.model_volume: give exactly one"):
        parse_config(_base(kubernetes={"model_volume": {"claim": "a", "host_path": "/b"}}))


def test_the_leaderworkerset_model_refuses_what_the_api_does_not_have():
    objects = kubernetes.render(load_config(REPO / "configs/k8s/tpu-v5e-prefill-v6e-decode.yaml"),
                                image=IMAGE)
    group = next(o for o in objects if o["kind"] == "LeaderWorkerSet")
    lws.check(group)
    for mutate, field in [
            (lambda g: g["spec"]["leaderWorkerTemplate"].update(sise=4), "sise"),
            (lambda g: g["spec"]["leaderWorkerTemplate"].update(restartPolicy="Always"),
             "restartPolicy"),
            (lambda g: g["spec"].update(startupPolicy="Eventually"), "startupPolicy"),
            (lambda g: g.update(apiVersion="leaderworkerset.x-k8s.io/v1beta1"), "apiVersion")]:
        broken = copy.deepcopy(group)
        mutate(broken)
        with pytest.raises(ConfigError, match=field):
            lws.check(broken)


def test_tls_ports_get_tcp_probes_and_secrets_are_mounted(tmp_path):
    data = _base(serving={"tls": {"cert_file": "/tls/cert.pem", "key_file": "/tls/key.pem"}})
    data["kubernetes"]["secret_mounts"] = {"jaxpd-tls": "/tls"}
    objects = kubernetes.render(parse_config(data), image=IMAGE, internal_secret="mine")
    validate(objects)
    assert objects[0]["kind"] == "ConfigMap"  # an existing secret: none rendered
    router = by_kind(objects)[("Deployment", "jaxpd-router")]["spec"]["template"]
    c = container(router)
    assert c["readinessProbe"]["tcpSocket"] == {"port": 50051}
    assert {"name": "secret-0", "mountPath": "/tls", "readOnly": True} in c["volumeMounts"]
    assert env(c)["JAXPD_INTERNAL_SECRET"]["secretKeyRef"]["name"] == "mine"
    worker = by_kind(objects)[("StatefulSet", "jaxpd-decode")]["spec"]["template"]
    assert "grpc" in container(worker)["readinessProbe"]  # internal calls are not TLS here
