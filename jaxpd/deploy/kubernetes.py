"""Kubernetes manifests for a whole deployment, from the same YAML `jaxpd serve` reads.

    objects = render(deployment, image="ghcr.io/me/jaxpd:0.1", name="jaxpd")

What comes out, in apply order:
- a Secret with the deployment's internal secret (every pod reads it; regenerate per
  deployment, keep it out of version control) unless an existing one is named;
- a ConfigMap holding the deployment YAML as the pods see it (listen addresses 0.0.0.0, fixed
  ports), mounted at /etc/jaxpd in every pod;
- per worker group, a headless Service (pod DNS `NAME-ROLE-I.NAME-ROLE`, which is how the
  router finds replica I) and either a StatefulSet (one host per replica: a core object, no
  controller to install) or a LeaderWorkerSet (several hosts per replica: its pods are created,
  restarted and deleted as a group, which is what a multi-controller JAX mesh needs; its
  environment tells each pod its host index and the leader's address);
- the router: a Deployment, its Service, and a PodDisruptionBudget.

Every worker pod runs `jaxpd serve ROLE --config /etc/jaxpd/deploy.yaml --replica I
--all-visible-devices` with I from its pod's index label, requests `nvidia.com/gpu` or
`google.com/tpu` (devices per host), and on TPU selects GKE nodes of the slice's type and
topology. Probes are native gRPC probes on `grpc.health.v1` (TCP when the port speaks TLS:
kubelet's gRPC probe has no TLS); `terminationGracePeriodSeconds` leaves room for the drain.
"""

from __future__ import annotations

import dataclasses
import math
import secrets as secrets_lib
from pathlib import PurePosixPath
from typing import Any

import yaml

from jaxpd.config import DeploymentConfig, MeshSection, groups_as_written
from jaxpd.errors import ConfigError

LWS_API = "leaderworkerset.x-k8s.io/v1"
CONFIG_DIR = "/etc/jaxpd"
CONFIG_FILE = "deploy.yaml"
CACHE_DIR = "/var/cache/jaxpd"
ROUTER_PORT, PREFILL_PORT, DECODE_PORT, METRICS_PORT, HTTP_PORT = 50051, 50061, 50071, 9090, 8000
# GKE node labels of each TPU generation's slices
TPU_NODE_TYPES = {"tpu-v5e": "tpu-v5-lite-podslice", "tpu-v5p": "tpu-v5p-slice",
                  "tpu-v6e": "tpu-v6e-slice"}
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"  # StatefulSet pods (Kubernetes 1.28+)
LWS_GROUP_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
SECRET_KEY = "secret"


def render(deployment: DeploymentConfig, *, image: str, name: str = "jaxpd",
           namespace: str | None = None, internal_secret: str | None = None) -> list[dict]:
    """Every object of the deployment, in apply order. `internal_secret`: the name of an
    existing Secret (key `secret`) to use instead of rendering a new one."""
    _check(deployment, name)
    r = _Renderer(deployment, image, name, namespace, internal_secret)
    return r.objects()


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # each probe spelt out, no &id001 anchors
        return True

    """Multi-line strings (the ConfigMap's YAML) as literal blocks, readable in the manifest."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def to_yaml(objects: list[dict]) -> str:
    """One multi-document YAML stream (`kubectl apply -f`)."""
    return "".join("---\n" + yaml.dump(o, Dumper=_Dumper, sort_keys=False) for o in objects)


@dataclasses.dataclass(frozen=True)
class Group:
    """One worker group as Kubernetes runs it: a StatefulSet (or LeaderWorkerSet) of its own,
    `NAME-ROLE` (or `NAME-ROLE-gI` when the role has several groups), whose pod i is the
    role's replica `first + i`."""

    role: str
    section: MeshSection
    key: str  # its YAML key, for errors: decode, or decode[1]
    index: int  # within its role
    first: int  # the role's replica number of its pod 0
    several: bool  # its role has other groups

    @property
    def component(self) -> str:
        """Its workload's suffix and component label (distinct per group: no two workloads'
        selectors overlap)."""
        return f"{self.role}-g{self.index}" if self.several else self.role


def groups(deployment: DeploymentConfig) -> list[Group]:
    """Every worker group, roles in order, each role's groups in order."""
    out = []
    for role in deployment.roles:
        first, sections = 0, deployment.groups(role)
        for index, section in enumerate(sections):
            out.append(Group(role, section, deployment.group_key(role, index), index, first,
                             len(sections) > 1))
            first += section.replicas
    return out


def group_port(role: str, group: MeshSection) -> int:
    return group.port or (PREFILL_PORT if role in ("prefill", "colocated") else DECODE_PORT)


def replica_addresses(name: str, group: Group) -> list[str]:
    """The group's replicas' gRPC addresses by pod DNS (the headless Service's subdomain; the
    short form resolves inside the namespace)."""
    workload = f"{name}-{group.component}"
    port = group_port(group.role, group.section)
    return [f"{workload}-{i}.{workload}:{port}" for i in range(group.section.replicas)]


def role_addresses(name: str, deployment: DeploymentConfig, role: str) -> list[str]:
    """Every replica address of `role`, in replica order (the router's address list)."""
    return [a for g in groups(deployment) if g.role == role for a in replica_addresses(name, g)]


def _check(deployment: DeploymentConfig, name: str) -> None:
    """What the manifests cannot do without, with the key to set."""
    if not _DNS_LABEL(name) or len(name) > 40:
        raise ConfigError(f"--name {name!r}: a lowercase DNS label of at most 40 characters")
    volume = deployment.kubernetes.model_volume
    checkpoint = deployment.model.checkpoint
    if checkpoint is not None:
        if volume is None:
            raise ConfigError("kubernetes.model_volume: the pods need the weights of "
                              f"model.checkpoint ({checkpoint}): name a PersistentVolumeClaim "
                              "(claim) or a node directory (host_path), and its mount")
        if not PurePosixPath(checkpoint).is_relative_to(volume.mount):
            raise ConfigError(f"model.checkpoint: {checkpoint} is not under "
                              f"kubernetes.model_volume.mount ({volume.mount}); write the path "
                              f"pods see, e.g. {volume.mount}/{PurePosixPath(checkpoint).name}")
    for g in groups(deployment):
        group, key = g.section, g.key
        if group.accelerator is None:
            raise ConfigError(f"{key}.accelerator: say what the group runs on for Kubernetes "
                              f"(h100-sxm, h200, a100-80gb, l4, l40s, tpu-v5e, tpu-v5p, tpu-v6e "
                              f"or cpu)")
        if group.accelerator.startswith("tpu") and group.topology is None:
            raise ConfigError(f"{key}.topology: a TPU group on Kubernetes needs its slice shape "
                              f"(e.g. 2x2 for 4 chips, 4x4 for 16), which GKE schedules on")


def _DNS_LABEL(text: str) -> bool:
    import re

    return bool(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", text))


class _Renderer:
    def __init__(self, deployment: DeploymentConfig, image: str, name: str,
                 namespace: str | None, internal_secret: str | None):
        self.d, self.image, self.name, self.namespace = deployment, image, name, namespace
        self.secret_name = internal_secret or f"{name}-internal"
        self.render_secret = internal_secret is None
        self.k8s = deployment.kubernetes
        self.grace = int(math.ceil(deployment.serving.drain_timeout_s)) + 30

    # -- objects ----------------------------------------------------------------------------------
    def objects(self) -> list[dict]:
        out = []
        if self.render_secret:
            out.append(self._object("v1", "Secret", self.secret_name, "secret", {
                "type": "Opaque", "stringData": {SECRET_KEY: secrets_lib.token_hex(24)}}))
        out.append(self._object("v1", "ConfigMap", f"{self.name}-config", "config", {
            "data": {CONFIG_FILE: yaml.safe_dump(self.cluster_config(), sort_keys=False)}}))
        for g in groups(self.d):
            out.append(self._headless_service(g))
            out.append(self._lws(g) if g.section.hosts > 1 else self._statefulset(g))
        out += self._router()
        return out

    def _meta(self, name: str, component: str) -> dict:
        meta: dict[str, Any] = {"name": name, "labels": self._labels(component)}
        if self.namespace:
            meta["namespace"] = self.namespace
        return meta

    def _labels(self, component: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": "jaxpd", "app.kubernetes.io/instance": self.name,
                "app.kubernetes.io/component": component}

    def _object(self, api: str, kind: str, name: str, component: str, body: dict) -> dict:
        return {"apiVersion": api, "kind": kind, "metadata": self._meta(name, component), **body}

    def cluster_config(self) -> dict:
        """The deployment YAML as the pods read it: every listener on 0.0.0.0 and fixed ports
        (a pod has its own address, so every replica of a group uses the same port)."""
        data = self.d.model_dump(mode="json", exclude_defaults=True)
        data.pop("kubernetes", None)  # a render setting, not the pods'
        serving = data.setdefault("serving", {})
        router = serving.setdefault("router", {})
        router.update(host="0.0.0.0", port=self.d.serving.router.port or ROUTER_PORT)
        if self.d.serving.metrics.enabled:
            serving.setdefault("metrics", {}).update(host="0.0.0.0", port=self._metrics_port())
        if self.d.serving.http is not None:
            serving.setdefault("http", {}).update(host="0.0.0.0", port=self._http_port())
        for g in groups(self.d):
            section = "decode" if g.role == "decode" else "prefill"
            listed = data.setdefault(section, [{}])
            listed[g.index].update(host="0.0.0.0", port=group_port(g.role, g.section))
        return groups_as_written(data)

    def _metrics_port(self) -> int:
        return self.d.serving.metrics.port or METRICS_PORT

    def _http_port(self) -> int:
        return self.d.serving.http.port or HTTP_PORT

    def _headless_service(self, g: Group) -> dict:
        """Pod DNS for the group (`NAME-ROLE-I.NAME-ROLE`); published before the pods are ready,
        since a multi-host replica's hosts meet through it while they start."""
        group, role = g.section, g.component
        workload = f"{self.name}-{role}"
        ports = [{"name": "grpc", "port": group_port(g.role, group)}]
        if group.hosts > 1:
            ports += [{"name": "coordinator", "port": group.coordinator_port},
                      {"name": "steps", "port": group.coordinator_port + 1}]
        selector = ({"leaderworkerset.sigs.k8s.io/name": workload} if group.hosts > 1
                    else self._labels(role))
        return self._object("v1", "Service", workload, role, {"spec": {
            "clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector,
            "ports": ports}})

    def _statefulset(self, g: Group) -> dict:
        workload, role = f"{self.name}-{g.component}", g.component
        return self._object("apps/v1", "StatefulSet", workload, role, {"spec": {
            "replicas": g.section.replicas, "serviceName": workload,
            "podManagementPolicy": "Parallel",  # replicas are independent: start them together
            "selector": {"matchLabels": self._labels(role)},
            "template": self._pod_template(g, POD_INDEX_LABEL, leader=True)}})

    def _lws(self, g: Group) -> dict:
        group, role = g.section, g.component
        workload = f"{self.name}-{role}"
        return self._object(LWS_API, "LeaderWorkerSet", workload, role, {"spec": {
            "replicas": group.replicas,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate", "rollingUpdateConfiguration": {
                "maxUnavailable": 1, "maxSurge": 0}},
            "networkConfig": {"subdomainPolicy": "Shared"},
            "leaderWorkerTemplate": {
                "size": group.hosts,
                "restartPolicy": "RecreateGroupOnPodRestart",  # one mesh: one life
                "leaderTemplate": self._pod_template(g, LWS_GROUP_LABEL, leader=True),
                "workerTemplate": self._pod_template(g, LWS_GROUP_LABEL, leader=False),
            }}})

    def _pod_template(self, g: Group, index_label: str, leader: bool) -> dict:
        group, role = g.section, g.role
        port = group_port(role, group)
        args = ["serve", role, "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--replica",
                "$(JAXPD_REPLICA)", "--all-visible-devices"]
        if g.several:  # the pod index counts within its group
            args += ["--group", str(g.index)]
        ports = []
        if leader:
            args += ["--port", str(port)]
            ports.append({"name": "grpc", "containerPort": port})
            if self.d.serving.metrics.enabled:
                args += ["--metrics-port", str(self._metrics_port())]
                ports.append({"name": "metrics", "containerPort": self._metrics_port()})
        if group.hosts > 1 and leader:
            ports += [{"name": "coordinator", "containerPort": group.coordinator_port},
                      {"name": "steps", "containerPort": group.coordinator_port + 1}]
        env = [{"name": "JAXPD_REPLICA", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.labels['{index_label}']"}}}, *self._common_env()]
        if group.accelerator == "cpu":
            env.append({"name": "JAX_PLATFORMS", "value": "cpu"})
        container: dict[str, Any] = {
            "name": role if leader else f"{role}-host", "image": self.image,
            "imagePullPolicy": self.k8s.image_pull_policy, "command": ["jaxpd"], "args": args,
            "env": env, "volumeMounts": self._mounts()}
        if ports:
            container["ports"] = ports
        resources = _accelerator_resources(group)
        if resources:
            container["resources"] = resources
        if leader:
            container.update(self._probes(port, internal=True))
        spec: dict[str, Any] = {"terminationGracePeriodSeconds": self.grace,
                                "containers": [container], "volumes": self._volumes()}
        selector = {**_accelerator_nodes(group), **group.node_selector}
        if selector:
            spec["nodeSelector"] = selector
        metadata: dict[str, Any] = {"labels": self._labels(g.component)}
        if leader and self.d.serving.metrics.enabled:
            metadata["annotations"] = self._scrape()
        return {"metadata": metadata, "spec": spec}

    def _router(self) -> list[dict]:
        name = f"{self.name}-router"
        port = self.d.serving.router.port or ROUTER_PORT
        args = ["serve", "router", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--port", str(port)]
        if self.d.mode == "disaggregated":
            args += ["--prefill-addresses",
                     ",".join(role_addresses(self.name, self.d, "prefill")),
                     "--decode-addresses",
                     ",".join(role_addresses(self.name, self.d, "decode"))]
        else:
            args += ["--decode-addresses",
                     ",".join(role_addresses(self.name, self.d, "colocated"))]
        ports = [{"name": "grpc", "containerPort": port}]
        service_ports = [{"name": "grpc", "port": port, "targetPort": "grpc",
                          "appProtocol": "kubernetes.io/h2c"}]
        if self.d.serving.http is not None:  # the OpenAI-compatible API
            args += ["--http-port", str(self._http_port())]
            ports.append({"name": "http", "containerPort": self._http_port()})
            service_ports.append({"name": "http", "port": self._http_port(), "targetPort": "http",
                                  "appProtocol": "http"})
        metadata: dict[str, Any] = {"labels": self._labels("router")}
        if self.d.serving.metrics.enabled:
            args += ["--metrics-port", str(self._metrics_port())]
            ports.append({"name": "metrics", "containerPort": self._metrics_port()})
            metadata["annotations"] = self._scrape()
        container = {"name": "router", "image": self.image,
                     "imagePullPolicy": self.k8s.image_pull_policy, "command": ["jaxpd"],
                     "args": args, "env": [*self._common_env(),
                                           {"name": "JAX_PLATFORMS", "value": "cpu"}],
                     "ports": ports, "volumeMounts": self._mounts(),
                     **self._probes(port, internal=False)}
        pod = {"metadata": metadata, "spec": {
            "terminationGracePeriodSeconds": self.grace, "containers": [container],
            "volumes": self._volumes()}}
        return [
            self._object("apps/v1", "Deployment", name, "router", {"spec": {
                "replicas": self.k8s.router_replicas,
                "selector": {"matchLabels": self._labels("router")},
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": pod}}),
            self._object("v1", "Service", name, "router", {"spec": {
                "type": self.k8s.service_type, "selector": self._labels("router"),
                "ports": service_ports}}),
            self._object("policy/v1", "PodDisruptionBudget", name, "router", {"spec": {
                "maxUnavailable": 1, "selector": {"matchLabels": self._labels("router")}}}),
        ]

    # -- pieces -----------------------------------------------------------------------------------
    def _common_env(self) -> list[dict]:
        return [{"name": "JAXPD_INTERNAL_SECRET", "valueFrom": {"secretKeyRef": {
                    "name": self.secret_name, "key": SECRET_KEY}}},
                {"name": "JAXPD_CACHE_DIR", "value": CACHE_DIR},
                {"name": "PYTHONUNBUFFERED", "value": "1"}]

    def _probes(self, port: int, internal: bool) -> dict:
        """Readiness, liveness and startup probes on the gRPC health service; startup allows
        serving.startup_timeout_s (loading and compiling). A TLS port gets TCP probes."""
        tls = self.d.serving.internal_tls if internal else self.d.serving.tls
        check = {"tcpSocket": {"port": port}} if tls is not None else \
            {"grpc": {"port": port, "service": ""}}
        period = 10
        return {
            "startupProbe": {**check, "periodSeconds": period, "failureThreshold": max(
                1, math.ceil(self.d.serving.startup_timeout_s / period))},
            "readinessProbe": {**check, "periodSeconds": 5, "failureThreshold": 2},
            "livenessProbe": {**check, "periodSeconds": period, "timeoutSeconds": 5,
                              "failureThreshold": max(
                                  3, math.ceil(self.d.serving.liveness_timeout_s / period) + 2)},
        }

    def _scrape(self) -> dict[str, str]:
        return {"prometheus.io/scrape": "true", "prometheus.io/port": str(self._metrics_port()),
                "prometheus.io/path": "/metrics"}

    def _mounts(self) -> list[dict]:
        mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                  {"name": "compile-cache", "mountPath": CACHE_DIR}]
        volume = self.k8s.model_volume
        if volume is not None:
            mounts.append({"name": "model", "mountPath": volume.mount, "readOnly": True})
        for i, (secret, path) in enumerate(sorted(self.k8s.secret_mounts.items())):
            mounts.append({"name": f"secret-{i}", "mountPath": path, "readOnly": True})
        return mounts

    def _volumes(self) -> list[dict]:
        volumes = [{"name": "config", "configMap": {"name": f"{self.name}-config"}},
                   {"name": "compile-cache", "emptyDir": {}}]  # survives container restarts
        volume = self.k8s.model_volume
        if volume is not None:
            source = ({"persistentVolumeClaim": {"claimName": volume.claim, "readOnly": True}}
                      if volume.claim else
                      {"hostPath": {"path": volume.host_path, "type": "Directory"}})
            volumes.append({"name": "model", **source})
        for i, (secret, _) in enumerate(sorted(self.k8s.secret_mounts.items())):
            volumes.append({"name": f"secret-{i}", "secret": {"secretName": secret}})
        return volumes


def _accelerator_resources(group: MeshSection) -> dict:
    """Devices each pod of the group asks for (one host's worth)."""
    n = group.devices_per_host
    if group.accelerator is None or group.accelerator == "cpu":
        return {}
    if group.accelerator.startswith("tpu"):
        return {"requests": {"google.com/tpu": n}, "limits": {"google.com/tpu": n}}
    return {"limits": {"nvidia.com/gpu": n}}


def _accelerator_nodes(group: MeshSection) -> dict[str, str]:
    """GKE's TPU node selectors: the slice type and its topology."""
    if group.accelerator in TPU_NODE_TYPES:
        return {"cloud.google.com/gke-tpu-accelerator": TPU_NODE_TYPES[group.accelerator],
                "cloud.google.com/gke-tpu-topology": group.topology}
    return {}
