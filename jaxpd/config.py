"""Deployment configuration: YAML in, a typed read-only config out, errors that name the key.

    model:      {checkpoint: DIR or null for the embedded default, dtype: null, scan_layers: false}
    mode:       colocated | disaggregated
    prefill:    {devices: [0, 1, 2, 3], tp: 4, replicas: 1, host: 127.0.0.1, port: 0}
    decode:     {devices: [4, 5], tp: 2}        # disaggregated only; a role may also list
                                                # several groups (decode on two accelerators)
    kv:         {page_size: 16, num_pages: 2048}
    attention:  auto | reference | cudnn | pallas
    scheduler:  {chunk_size: 256, max_prefill_tokens: 2048, max_decode_batch: 64, prefix_caching: true,
                 decode_steps_per_dispatch: 8, overlap: false, prefill_batch_sizes: null,
                 prefill_chunk_sizes: null, decode_batch_sizes: null}
    serving:    {router: {host: 127.0.0.1, port: 50051}, transport: grpc, ...}   # `jaxpd serve`
    seed: 0

One file describes both an in-process engine (`jaxpd generate`) and a served deployment
(`jaxpd serve`): the `prefill`/`decode` sections are the worker groups, each replica using
`tp` of the listed devices, so devices and TP are written once for both uses.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jaxpd.errors import ConfigError


def _power_of_two(v: int) -> int:
    """Page and chunk sizes are shape buckets: powers of two keep compilations few."""
    if v & (v - 1):
        raise ValueError(f"must be a power of two, got {v}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    checkpoint: str | None = Field(None, description="HF or orbax folder; null = the embedded default model")
    name: str | None = Field(None, min_length=1, description="the name clients ask for (the "
                                                             "OpenAI API's `model`); default: "
                                                             "the checkpoint folder's name")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="compute dtype; null = the checkpoint's (float32 on CPU)")
    weight_dtype: Literal["float8_e4m3fn"] | None = Field(
        None, description="float8_e4m3fn stores the decoder layers' linear weights in FP8 with "
                          "a scale per output row, widened to `dtype` in each matmul: half of "
                          "bf16's weight bytes (what a decode step streams), at a small "
                          "accuracy cost; null = weights in `dtype`")
    scan_layers: bool = Field(
        False, description="true compiles one decoder layer and scans it over stacked layer "
                           "weights (compile time independent of depth, for deep models and "
                           "fast starts); false unrolls every layer (faster steps)")


ACCELERATORS = ("h100-sxm", "h200", "a100-80gb", "l4", "l40s", "tpu-v5e", "tpu-v5p", "tpu-v6e",
                "cpu")  # the hardware catalog's keys (configs/hardware/), and cpu
_TOPOLOGY = re.compile(r"^[1-9][0-9]*(x[1-9][0-9]*){1,2}$")


class MeshSection(_Strict):
    """A worker group: `replicas` workers, each a TP mesh over its own `tp` devices. A replica
    runs on `hosts` processes (one per host); with one host, replica i uses
    devices[i*tp:(i+1)*tp]; with several, every host of every replica uses the local `devices`,
    and `tp` is hosts times devices per host."""

    devices: list[int] = Field(description="device indices (GPU ordinals, TPU chips, or host CPU "
                                           "devices); replica i uses devices[i*tp:(i+1)*tp], or, "
                                           "with hosts > 1, these local devices on every host")
    tp: int = Field(1, ge=1, description="tensor-parallel degree of each replica (all its hosts)")
    replicas: int = Field(1, ge=1, description="worker processes in this group (`jaxpd serve`)")
    hosts: int = Field(1, ge=1, description="processes (hosts) per replica: a model too big for "
                                            "one host spans several, as one JAX mesh")
    accelerator: Literal[ACCELERATORS] | None = Field(
        None, description="what the group runs on: a hardware catalog key (h100-sxm, h200, "
                          "a100-80gb, l4, l40s, tpu-v5e, tpu-v5p, tpu-v6e) or cpu")
    topology: str | None = Field(None, description="a TPU slice's shape, e.g. 4x4 or 2x2x2 (the "
                                                   "chips of one replica; required for TPU groups "
                                                   "on Kubernetes)")
    host: str = Field("127.0.0.1", description="address the group's workers listen on")
    port: int = Field(0, ge=0, le=65535, description="replica i listens on port + i; 0 = any free "
                                                     "port (only when one `jaxpd serve` starts all)")
    coordinator_port: int = Field(8476, ge=1, le=65534, description=(
        "hosts > 1: the port of jax.distributed's coordinator on each replica's first host; "
        "the step stream to the other hosts uses the next port"))
    node_selector: dict[str, str] = Field(default_factory=dict, description=(
        "Kubernetes node labels this group's pods must run on (`jaxpd deploy render`), e.g. an "
        "inventory pool's labels"))
    weight: float = Field(1.0, gt=0, description=(
        "the share of its role's requests each replica of this group takes, relative to the "
        "role's other groups (the router sends a request to the worker with the fewest requests "
        "per unit of weight): a group's capacity, e.g. requests/s per replica as `jaxpd place` "
        "writes it. Only matters when a role has several groups"))
    num_pages: int | None = Field(None, ge=2, description="KV pages of each replica of this "
                                                          "group; null = kv.num_pages (a group "
                                                          "on devices with more memory holds "
                                                          "more)")
    max_decode_batch: int | None = Field(None, ge=1, description=(
        "sequences per decode step on this group's replicas; null = scheduler.max_decode_batch "
        "(a slower accelerator meets the TPOT SLO at a smaller batch)"))

    @field_validator("devices")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one device index")
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"device indices must be distinct and >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _tp_divides(self) -> MeshSection:
        if self.hosts > 1:
            if self.tp != self.hosts * len(self.devices):
                raise ValueError(f"tp: {self.tp} must be hosts ({self.hosts}) x devices per host "
                                 f"({len(self.devices)}, the local devices listed) = "
                                 f"{self.hosts * len(self.devices)}")
        elif len(self.devices) % self.tp:
            raise ValueError(f"tp={self.tp} must divide the number of devices ({len(self.devices)})")
        elif len(self.devices) != self.tp * self.replicas:
            raise ValueError(f"{self.replicas} replica(s) of tp={self.tp} need "
                             f"{self.tp * self.replicas} devices, got {len(self.devices)} "
                             f"(replica i uses devices[i*tp:(i+1)*tp])")
        if self.topology is not None:
            if not _TOPOLOGY.match(self.topology):
                raise ValueError(f"topology: {self.topology!r} is not a slice shape like 4x4 or "
                                 f"2x2x2")
            if self.accelerator is not None and not self.accelerator.startswith("tpu"):
                raise ValueError(f"topology: only TPU slices have one (accelerator is "
                                 f"{self.accelerator})")
            chips = math.prod(int(n) for n in self.topology.split("x"))
            if chips != self.tp:
                raise ValueError(f"topology: {self.topology} is {chips} chips but a replica has "
                                 f"tp={self.tp} (hosts x devices per host)")
        return self

    @property
    def devices_per_host(self) -> int:
        return len(self.devices) if self.hosts > 1 else self.tp

    def replica_devices(self, replica: int) -> list[int]:
        """The local device indices each process of `replica` uses."""
        if self.hosts > 1:
            return list(self.devices)
        return self.devices[replica * self.tp:(replica + 1) * self.tp]

    def address(self, replica: int) -> str | None:
        """host:port of a replica, or None when the port is chosen at start (port 0)."""
        return f"{self.host}:{self.port + replica}" if self.port else None


class KVSection(_Strict):
    page_size: int = Field(16, ge=1, description="tokens per KV page (power of two)")
    num_pages: int = Field(2048, ge=2, description="pages per pool (one pool per mesh)")
    dtype: str = Field("auto", description="what the pool stores: auto (the model's dtype), "
                                           "float32, bfloat16, float16, float8_e4m3fn (fp8: "
                                           "half of bfloat16's bytes per token, unscaled), or "
                                           "int8 (a scale per token and head: 52% of bf16's "
                                           "bytes at head_dim 128)")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        from jaxpd.kv.dtypes import canonical_kv_dtype

        return canonical_kv_dtype(v)

    _pow2 = field_validator("page_size")(classmethod(lambda cls, v: _power_of_two(v)))


class SchedulerSection(_Strict):
    chunk_size: int = Field(256, ge=16, description="max prompt tokens per sequence per prefill step (power of two)")
    max_prefill_tokens: int = Field(2048, ge=16, description="max tokens in one prefill step")
    max_decode_batch: int = Field(64, ge=1, description="max sequences per decode step")
    prefix_caching: bool = Field(True, description="reuse cached KV blocks of shared prompt prefixes")
    decode_steps_per_dispatch: int = Field(
        8, ge=1, description="decode steps run on device per call (stops are checked on device): "
        "fewer host round trips per token; larger values make new requests and aborts wait "
        "longer for the running call. 1 = one token per call")
    overlap: bool = Field(
        False, description="dispatch each decode call before the previous call's tokens reach "
        "the host, so the host prepares one call while the device runs the other; outputs and "
        "stop strings trail the device by one call. For accelerators: on CPU the 'device' is the "
        "host's own cores and it measured slower")

    prefill_batch_sizes: list[int] | None = Field(
        None, description="sequences per prefill step that get a compiled program (ascending); "
        "a step is padded up to the next one and holds at most the last. null = 1, 2, 4, 8, 16")
    prefill_chunk_sizes: list[int] | None = Field(
        None, description="chunk lengths that get a compiled program (ascending, the last equal "
        "to chunk_size). null = powers of two from 16 to chunk_size")
    decode_batch_sizes: list[int] | None = Field(
        None, description="decode batch sizes that get a compiled program (ascending, the last "
        "at least max_decode_batch). null = powers of two up to max_decode_batch")

    _pow2 = field_validator("chunk_size")(classmethod(lambda cls, v: _power_of_two(v)))

    @field_validator("prefill_batch_sizes", "prefill_chunk_sizes", "decode_batch_sizes")
    @classmethod
    def _ascending(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or v[0] < 1 or any(a >= b for a, b in zip(v, v[1:]))):
            raise ValueError(f"must be positive sizes in ascending order, got {v}")
        return v

    @model_validator(mode="after")
    def _buckets_reach_the_limits(self) -> SchedulerSection:
        if self.prefill_chunk_sizes and self.prefill_chunk_sizes[-1] != self.chunk_size:
            raise ValueError(f"prefill_chunk_sizes: the last must be chunk_size="
                             f"{self.chunk_size}, got {self.prefill_chunk_sizes[-1]}")
        if self.decode_batch_sizes and self.decode_batch_sizes[-1] < self.max_decode_batch:
            raise ValueError(f"decode_batch_sizes: the last must be at least max_decode_batch="
                             f"{self.max_decode_batch}, got {self.decode_batch_sizes[-1]}")
        return self


class RouterSection(_Strict):
    host: str = Field("127.0.0.1", description="address the public Generation service listens on")
    port: int = Field(50051, ge=0, le=65535, description="its port; 0 = any free port")


class TLSFiles(_Strict):
    """PEM files. Public API: `cert_file` and `key_file` (and `ca_file`, the CA that signed
    them, for jaxpd's own clients to verify with). Internal (mutual) TLS: all three, one CA for
    the deployment; a worker takes internal calls only from peers with a certificate it signed."""

    cert_file: str = Field(description="this side's certificate chain (PEM)")
    key_file: str = Field(description="its private key (PEM)")
    ca_file: str | None = Field(None, description="the CA certificate (PEM) peers are checked "
                                                  "against")

    def read(self, key: str) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, CA or None), or ConfigError naming `key`."""
        def one(field: str, path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise ConfigError(f"{key}.{field}: cannot read {path} ({e.strerror})") from None
            if b"-----BEGIN" not in data:
                raise ConfigError(f"{key}.{field}: {path} is not a PEM file")
            return data
        return one("cert_file", self.cert_file), one("key_file", self.key_file), \
            one("ca_file", self.ca_file)


class MetricsSection(_Strict):
    """Prometheus metrics over HTTP, one endpoint per process (URLs in GetServerInfo)."""

    enabled: bool = Field(True, description="serve /metrics from every process")
    host: str = Field("127.0.0.1", description="address the metrics endpoints listen on")
    port: int = Field(0, ge=0, le=65535, description="the router's metrics port; worker i (in "
                                                     "start order) uses port + 1 + i; 0 = any "
                                                     "free port")


class HttpSection(_Strict):
    """The OpenAI-compatible HTTP API, served by the router process beside gRPC."""

    host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    port: int = Field(8000, ge=0, le=65535, description="its port; 0 = any free port")
    chat_template: str | None = Field(None, description="a jinja2 chat template file that "
                                                        "replaces the checkpoint's (also "
                                                        "`jaxpd serve --chat-template`)")


class RestartSection(_Strict):
    """`jaxpd serve` restarts a dead worker (the others keep serving) until `attempts` restarts
    of it have failed in a row; then it stops everything, as without restarts."""

    attempts: int = Field(5, ge=0, description="restarts per worker in a row; 0 = never restart "
                                               "(a death stops the deployment)")
    backoff_s: float = Field(1.0, ge=0, description="wait before the first restart; doubles on "
                                                    "each failed one (at most 30 s)")


class ServingSection(_Strict):
    """How `jaxpd serve` runs the deployment: the router, the KV transport, queues and timeouts."""

    router: RouterSection = RouterSection()
    transport: Literal["grpc", "tcp", "shm", "jax", "auto"] = Field(
        "grpc", description="KV hand-off between worker processes: grpc (client streams); tcp "
                            "(gRPC carries the control messages, the KV bytes go over pooled "
                            "raw TCP connections into preallocated buffers); shm (prefill and "
                            "decode workers on one host: the bytes go through shared memory); "
                            "jax (the decode worker pulls the KV from the prefill worker's "
                            "device through JAX's transfer server, jax.experimental.transfer); "
                            "auto (shm where a prefill worker reaches the decode worker on "
                            "loopback; else jax when both are accelerators; else tcp)")
    data_host: str | None = Field(None, description="tcp: the address decode workers advertise "
                                                    "for their data plane, which listens on the "
                                                    "group's host (default: that host, or this "
                                                    "machine's name when it is 0.0.0.0)")
    local_prefill_max_tokens: int = Field(
        0, ge=0, description="conditional disaggregation: a decode worker prefills a request "
                             "itself when the part of its prompt not in that worker's prefix "
                             "cache (a conversation's new turn) is at most this many tokens; "
                             "longer ones go to a prefill worker, which sends only the KV the "
                             "decode worker lacks. 0: always disaggregate")
    reserve_while_decoding: bool = Field(
        True, description="a decode worker answers a KV reservation while its decode call runs "
                          "on the device (host bookkeeping only), so a new request's prefill "
                          "need not wait out a call of decode_steps_per_dispatch steps. false: "
                          "only between calls. On one CPU host, where prefill and decode share "
                          "the cores, starting prefill mid-call trades decode speed for TTFT "
                          "(configs/local.yaml turns it off)")
    max_waiting: int = Field(256, ge=1, description="requests queued per worker before new ones "
                                                    "get RESOURCE_EXHAUSTED")
    kv_message_bytes: int = Field(4 << 20, ge=64 << 10, le=256 << 20,
                                  description="largest KV payload in one gRPC message")
    kv_timeout_s: float = Field(
        120.0, gt=0, description="longest a request may take from the decode worker reserving "
                                 "pages to holding all of its KV (its prefill included); past it "
                                 "both workers give up and free the request's pages")
    startup_timeout_s: float = Field(600.0, gt=0, description="how long `jaxpd serve` waits for "
                                                              "every process to report SERVING")
    record_kv_digests: bool = Field(False, description="workers keep a crc32c of each request's "
                                                       "KV, for verification (GetKVDigests)")
    max_request_bytes: int = Field(4 << 20, ge=4 << 10, le=1 << 30,
                                   description="largest message the public API accepts (a "
                                               "GenerateRequest); larger ones get "
                                               "RESOURCE_EXHAUSTED before they are read")
    max_queued: int = Field(1024, ge=0, description="requests the router holds while every decode "
                                                     "pool is full (FCFS); past it new ones get "
                                                     "RESOURCE_EXHAUSTED")
    queue_timeout_s: float = Field(30.0, gt=0, description="longest a queued request waits for "
                                                           "free KV pages when its call has no "
                                                           "deadline")
    max_migrations: int = Field(3, ge=0, description="times a request may move to another worker "
                                                     "after its worker failed, before it fails "
                                                     "UNAVAILABLE")
    liveness_timeout_s: float = Field(5.0, gt=0, description="a worker that answers no load "
                                                             "report for this long is treated as "
                                                             "dead (frozen, unreachable): its "
                                                             "requests move to other workers")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long running requests "
                                                           "may take to finish before every "
                                                           "process exits")
    tls: TLSFiles | None = Field(None, description="TLS on the public API (the router's port)")
    internal_tls: TLSFiles | None = Field(None, description="mutual TLS between the router and "
                                                            "workers and between workers (needs "
                                                            "ca_file)")
    auth_token_file: str | None = Field(None, description="a file holding the bearer token every "
                                                          "public call must carry (authorization: "
                                                          "Bearer TOKEN); also JAXPD_API_TOKEN")
    metrics: MetricsSection = Field(default_factory=lambda: MetricsSection(),
                                    description="Prometheus metrics of every process")
    http: HttpSection | None = Field(None, description="the OpenAI-compatible HTTP API "
                                                       "(/v1/completions, /v1/chat/completions); "
                                                       "off when absent")

    @model_validator(mode="after")
    def _mutual_tls_needs_a_ca(self) -> ServingSection:
        if self.internal_tls is not None and self.internal_tls.ca_file is None:
            raise ValueError("internal_tls.ca_file: mutual TLS needs the deployment's CA "
                             "certificate")
        if self.internal_tls is not None and self.transport in ("tcp", "jax", "auto"):
            raise ValueError(f"transport: {self.transport} carries KV unencrypted (TLS would add "
                             f"the copy it exists to avoid); with internal_tls use grpc or shm, "
                             f"or tcp on a private network without internal_tls")
        return self
    restart: RestartSection = Field(default_factory=lambda: RestartSection(),
                                    description="how `jaxpd serve` restarts a worker that died")


class ModelVolume(_Strict):
    """Where a Kubernetes pod finds the weights: a PersistentVolumeClaim or a node's path,
    mounted read-only at `mount`; `model.checkpoint` must be a path under it."""

    claim: str | None = Field(None, description="a PersistentVolumeClaim's name (ReadOnlyMany, "
                                                "or ReadWriteOnce on one node)")
    host_path: str | None = Field(None, description="a directory on every node instead")
    mount: str = Field("/models", description="where pods see the volume")

    @model_validator(mode="after")
    def _one_source(self) -> ModelVolume:
        if (self.claim is None) == (self.host_path is None):
            raise ValueError("give exactly one of claim (a PersistentVolumeClaim) or host_path")
        if not self.mount.startswith("/"):
            raise ValueError(f"mount: {self.mount!r} must be an absolute path")
        return self


class KubernetesSection(_Strict):
    """What `jaxpd deploy render --target kubernetes` needs beyond the deployment itself."""

    model_volume: ModelVolume | None = Field(None, description="the weights' volume (needed "
                                                               "unless the embedded model is "
                                                               "served)")
    router_replicas: int = Field(2, ge=1, description="router pods behind the Service (the "
                                                      "PodDisruptionBudget keeps one up)")
    service_type: Literal["ClusterIP", "LoadBalancer", "NodePort"] = Field(
        "ClusterIP", description="the router Service's type")
    secret_mounts: dict[str, str] = Field(default_factory=dict, description=(
        "Secrets mounted read-only in every pod, name -> directory (the TLS and token files "
        "that serving.tls / auth_token_file name)"))
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


def _as_groups(v):
    """A role's section is one group (a mapping) or a list of groups."""
    if v is None or isinstance(v, (list, tuple)):
        return v
    return [v]


class DeploymentConfig(_Strict):
    """A role (prefill, decode; colocated workers are the `prefill` section) has one group or a
    list of groups, e.g. decode on TPU v5e and v6e together. A role's replicas are numbered
    across its groups in order (decode-0 and decode-1 in the first group of two replicas,
    decode-2 in the second), which is how `--replica`, worker names and address lists count."""

    model: ModelSection = ModelSection()
    mode: Literal["colocated", "disaggregated"] = "colocated"
    prefill: tuple[MeshSection, ...] = (MeshSection(devices=[0], tp=1),)
    decode: tuple[MeshSection, ...] | None = None
    kv: KVSection = KVSection()
    attention: Literal["auto", "reference", "cudnn", "pallas"] = "auto"
    scheduler: SchedulerSection = SchedulerSection()
    serving: ServingSection = ServingSection()
    kubernetes: KubernetesSection = Field(default_factory=lambda: KubernetesSection(),
                                          description="`jaxpd deploy render` settings")
    seed: int = 0

    _groups = field_validator("prefill", "decode", mode="before")(
        classmethod(lambda cls, v: _as_groups(v)))

    @field_validator("prefill", "decode")
    @classmethod
    def _some_group(cls, v):
        if v is not None and not v:
            raise ValueError("needs at least one group")
        return v

    @model_validator(mode="after")
    def _mode_matches_meshes(self) -> DeploymentConfig:
        if self.mode == "disaggregated":
            if self.decode is None:
                raise ValueError("mode 'disaggregated' needs a 'decode' mesh")
            if self.serving.transport == "jax" and max(
                    g.hosts for g in self.prefill + self.decode) > 1:
                raise ValueError("serving.transport: jax pulls one process's buffers; with "
                                 "multi-host replicas (hosts > 1) use grpc or tcp")
        elif self.decode is not None:
            raise ValueError("'decode' is only used with mode: disaggregated (remove it or change mode)")
        named = [(self.group_key(role, i), g) for role in self.roles
                 for i, g in enumerate(self.groups(role))]
        for n, (key_a, a) in enumerate(named):
            for key_b, b in named[n + 1:]:
                # other hosts or other accelerator kinds (other machines): other devices
                shared = set(a.devices) & set(b.devices)
                if (shared and a.hosts == b.hosts == 1 and a.accelerator == b.accelerator
                        and a.host == b.host):
                    raise ValueError(f"{key_b}.devices: {key_a} uses devices {sorted(shared)} "
                                     f"too")
        batches = self.scheduler.decode_batch_sizes
        for role in self.roles:
            for i, g in enumerate(self.groups(role)):
                if batches and g.max_decode_batch and g.max_decode_batch > batches[-1]:
                    raise ValueError(f"{self.group_key(role, i)}.max_decode_batch: "
                                     f"scheduler.decode_batch_sizes ends at {batches[-1]}")
        return self

    # -- a role's groups and replicas --------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        """The worker roles this deployment runs (`colocated` uses the prefill section)."""
        return ("prefill", "decode") if self.mode == "disaggregated" else ("colocated",)

    def groups(self, role: str) -> tuple[MeshSection, ...]:
        """The groups of `role` (prefill, decode, or colocated: the prefill section)."""
        if role == "decode":
            return self.decode or ()
        return self.prefill

    def group_key(self, role: str, index: int) -> str:
        """The YAML key of a group, as errors name it: `decode`, or `decode[1]` of several."""
        section = "decode" if role == "decode" else "prefill"
        return section if len(self.groups(role)) == 1 else f"{section}[{index}]"

    def replicas(self, role: str) -> int:
        return sum(g.replicas for g in self.groups(role))

    def locate(self, role: str, replica: int) -> tuple[MeshSection, int, int]:
        """(group, its index, the replica's index within it) of `role`'s replica number
        `replica` (numbered across the groups in order); IndexError past the last."""
        local = replica
        for index, group in enumerate(self.groups(role)):
            if 0 <= local < group.replicas:
                return group, index, local
            local -= group.replicas
        raise IndexError(f"{role} has {self.replicas(role)} replica(s), not {replica + 1}")

    def weights(self, role: str) -> list[float]:
        """Each replica's routing weight, in replica order."""
        return [g.weight for g in self.groups(role) for _ in range(g.replicas)]

    def for_group(self, role: str, index: int) -> DeploymentConfig:
        """This deployment as one group of `role` sees it: that group alone in its section,
        with its own `num_pages` and `max_decode_batch` in kv and scheduler (what a worker
        process builds its engine from)."""
        group = self.groups(role)[index]
        section = "decode" if role == "decode" else "prefill"
        update: dict = {section: (group,)}
        if group.num_pages is not None:
            update["kv"] = self.kv.model_copy(update={"num_pages": group.num_pages})
        if group.max_decode_batch is not None:
            update["scheduler"] = self.scheduler.model_copy(
                update={"max_decode_batch": group.max_decode_batch})
        return self.model_copy(update=update)


def groups_as_written(data: dict) -> dict:
    """Config data (`model_dump`) with a role of one group written as a mapping, as people
    write it, rather than a list of one."""
    for section in ("prefill", "decode"):
        if isinstance(data.get(section), list) and len(data[section]) == 1:
            data[section] = data[section][0]
    return data


def _format(e: ValidationError, where: str, data: dict | None = None) -> str:
    lines = []
    for err in e.errors():
        loc = list(err["loc"])
        if (len(loc) > 1 and loc[0] in ("prefill", "decode") and loc[1] == 0
                and isinstance((data or {}).get(loc[0]), dict)):
            del loc[1]  # written as one group (a mapping): name it as written
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                      for p in loc).lstrip(".") or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        named = re.match(r"^([a-z_][a-z_.\[\]0-9]*): (.*)$", msg, re.S)  # a check naming its own key
        if named and err["type"] == "value_error":
            key = named.group(1) if key == "(top level)" else f"{key}.{named.group(1)}"
            msg = named.group(2)
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and indentation)"
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict | None, where: str = "<config>") -> DeploymentConfig:
    try:
        return DeploymentConfig.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(_format(e, where, data if isinstance(data, dict) else None)) from None


def load_config(path: str | Path) -> DeploymentConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_config(data, str(path))
