"""The LeaderWorkerSet fields jaxpd writes, as a strict model of `leaderworkerset.x-k8s.io/v1`
(written from the API reference: kubernetes-sigs/lws, api/leaderworkerset/v1/
leaderworkerset_types.go). kubernetes-validate knows only core objects, so every rendered
LeaderWorkerSet is checked against this model (a misspelt or misplaced field fails), and its
pod templates are checked as Pods by the caller.

Only what jaxpd renders is modelled; anything else is refused rather than passed unchecked.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jaxpd.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectMeta(_Strict):
    name: str = Field(pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class PodTemplate(_Strict):
    """corev1.PodTemplateSpec: the spec itself is validated as a Pod's by kubernetes-validate."""

    metadata: dict = {}
    spec: dict


class LeaderWorkerTemplate(_Strict):
    leaderTemplate: PodTemplate | None = None
    workerTemplate: PodTemplate
    size: int = Field(1, ge=1, description="pods per group, the leader included")
    restartPolicy: Literal["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart",
                           "None"] = "RecreateGroupOnPodRestart"


class RollingUpdateConfiguration(_Strict):
    partition: int | None = Field(None, ge=0)
    maxUnavailable: int | str = 1
    maxSurge: int | str = 0


class RolloutStrategy(_Strict):
    type: Literal["RollingUpdate"]
    rollingUpdateConfiguration: RollingUpdateConfiguration | None = None


class NetworkConfig(_Strict):
    subdomainPolicy: Literal["Shared", "UniquePerReplica"]


class LeaderWorkerSetSpec(_Strict):
    replicas: int = Field(1, ge=0)
    leaderWorkerTemplate: LeaderWorkerTemplate
    rolloutStrategy: RolloutStrategy | None = None
    startupPolicy: Literal["LeaderCreated", "LeaderReady"] = "LeaderCreated"
    networkConfig: NetworkConfig | None = None


class LeaderWorkerSet(_Strict):
    apiVersion: Literal["leaderworkerset.x-k8s.io/v1"]
    kind: Literal["LeaderWorkerSet"]
    metadata: ObjectMeta
    spec: LeaderWorkerSetSpec


def check(obj: dict) -> LeaderWorkerSet:
    """The object as a LeaderWorkerSet, or ConfigError listing what does not fit."""
    try:
        return LeaderWorkerSet.model_validate(obj)
    except ValidationError as e:
        where = obj.get("metadata", {}).get("name", "?")
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"LeaderWorkerSet {where}: {problems}") from None


def pod_templates(obj: dict) -> dict[str, dict]:
    """{"leader"/"worker": pod template} of a LeaderWorkerSet."""
    template = obj["spec"]["leaderWorkerTemplate"]
    out = {"worker": template["workerTemplate"]}
    if template.get("leaderTemplate") is not None:
        out["leader"] = template["leaderTemplate"]
    return out
