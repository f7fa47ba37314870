"""Prometheus metrics of every jaxpd process, served over HTTP by prometheus-client.

Names follow vLLM's (`jaxpd:time_to_first_token_seconds`, `jaxpd:num_requests_running`, ...),
so dashboards written for vLLM need only the prefix changed. The router measures what clients
see: requests by finish reason and by status code, TTFT, TPOT, inter-token latency, end-to-end
latency and queue time, requests in flight and queued, migrations. A worker reports its engine:
requests running and waiting, KV pages used and free, preemptions, KV bytes and seconds sent and
received, step time and batch size, compiled programs. Worker gauges are read from the engine
thread's published load snapshot at scrape time, never from engine state.

Each process serves its own registry (plus the process collector: RSS, CPU, open files) on
`serving.metrics.port` (0: any free port; `jaxpd serve` fixes one per process), and reports the
URL in GetServerInfo.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

# Buckets as vLLM's (seconds), trimmed.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def serve(registry: CollectorRegistry, host: str, port: int) -> str:
    """Serve `registry` on host:port (0 = any free port); the URL to scrape."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{bound}/metrics"


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


class RouterMetrics:
    """What the router's clients see."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = r = _registry()
        self.success = Counter("jaxpd:request_success", "Requests that completed, by finish "
                               "reason", ["finished_reason"], registry=r)
        self.errors = Counter("jaxpd:request_errors", "Requests that ended with an error status, "
                              "by gRPC code", ["code"], registry=r)
        self.ttft = Histogram("jaxpd:time_to_first_token_seconds", "Time to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("jaxpd:time_per_output_token_seconds", "Mean time per output token "
                              "after the first, per request", buckets=TPOT_BUCKETS, registry=r)
        self.itl = Histogram("jaxpd:inter_token_latency_seconds", "Time between consecutive "
                             "streamed chunks, per token", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("jaxpd:e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("jaxpd:request_queue_time_seconds", "Time from arrival until "
                               "prefill started", buckets=E2E_BUCKETS, registry=r)
        self.migrations = Counter("jaxpd:request_migrations", "Times a request moved to another "
                                  "worker after its worker failed", registry=r)
        self.prompt_tokens = Counter("jaxpd:prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("jaxpd:generation_tokens", "Tokens streamed to clients",
                                         registry=r)
        Gauge("jaxpd:num_requests_running", "Requests in flight at the router",
              registry=r).set_function(running)
        Gauge("jaxpd:num_requests_waiting", "Requests queued at the router for free KV pages",
              registry=r).set_function(waiting)


class WorkerMetrics:
    """A worker's engine, from its published snapshot plus counters the servicers bump."""

    def __init__(self, snapshot: Callable[[], dict], programs: Callable[[], int]):
        self.registry = r = _registry()
        r.register(_SnapshotCollector(snapshot, programs))
        self.kv_bytes = Counter("jaxpd:kv_transfer_bytes", "KV bytes moved between workers",
                                ["direction"], registry=r)
        self.kv_seconds = Counter("jaxpd:kv_transfer_seconds", "Seconds spent moving KV between "
                                  "workers (per request, first byte to acknowledgement)",
                                  ["direction"], registry=r)
        self.step = Histogram("jaxpd:engine_step_seconds", "Duration of one engine step",
                              buckets=TPOT_BUCKETS, registry=r)
        self.batch = Histogram("jaxpd:engine_batch_size", "Sequences in the engine's batch per "
                               "step", buckets=BATCH_BUCKETS, registry=r)
        self.request_path_compiles = Counter("jaxpd:request_path_compilations", "XLA "
                                             "compilations on the engine thread", registry=r)

    def kv_moved(self, direction: str, size: int, began: float) -> None:
        self.kv_bytes.labels(direction).inc(size)
        self.kv_seconds.labels(direction).inc(max(0.0, time.monotonic() - began))


class _SnapshotCollector:
    def __init__(self, snapshot: Callable[[], dict], programs: Callable[[], int]):
        self.snapshot, self.programs = snapshot, programs

    def collect(self):
        s = self.snapshot()
        gauges = {"num_requests_running": ("Sequences in the engine's batch", s.get("running", 0)),
                  "num_requests_waiting": ("Requests queued before admission", s.get("waiting", 0)),
                  "num_requests_transferring": ("Requests whose KV is being sent or received",
                                                s.get("transferring", 0)),
                  "kv_pages_used": ("KV pages in use", s.get("kv_pages_used", 0)),
                  "kv_pages_free": ("KV pages free", s.get("kv_pages_free", 0)),
                  "compiled_programs": ("Step programs compiled", self.programs())}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"jaxpd:{name}", doc, value=value)
        yield CounterMetricFamily("jaxpd:num_preemptions", "Sequences preempted (pages "
                                  "reclaimed, recomputed later)", value=s.get("preemptions", 0))
