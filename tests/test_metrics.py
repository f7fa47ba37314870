"""Worker metrics read the engine thread's load snapshot: preemptions under page pressure and
page counts show up as Prometheus samples (the rest move in tests/test_serving.py)."""

from __future__ import annotations

import urllib.request

import pytest

from prometheus_client.parser import text_string_to_metric_families

from conftest import deployment, first_programs_only
from jaxpd.engine.builder import build_engine
from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.serving import metrics
from jaxpd.serving.decode_worker import DecodeScheduler
from jaxpd.transfer import wire


@pytest.mark.slow
def test_preemptions_and_pages_reach_the_metrics_endpoint(llama):
    engine = first_programs_only(build_engine(llama.config, llama.params, deployment(
        page_size=4, num_pages=24, chunk_size=16, max_decode_batch=8)))
    ctx = wire.WireContext(b"x" * 16, engine.decode.manager.layout)
    scheduler = DecodeScheduler(engine, ctx)
    events = []
    for i in range(5):
        prompt = tuple(range(3 + i, 23 + i))
        scheduler.add_local(Request(f"r{i}", prompt, SamplingParams(max_tokens=20, ignore_eos=True)),
                            i, events.append)
    snapshots = [scheduler.load()]
    worker = metrics.WorkerMetrics(lambda: snapshots[-1], lambda: 2)
    url = metrics.serve(worker.registry, "127.0.0.1", 0)
    while scheduler.has_work():
        scheduler.step()
        snapshots.append(scheduler.load())
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["jaxpd:num_preemptions_total"] == engine.num_preemptions > 0
    assert samples["jaxpd:kv_pages_used"] == 0 and samples["jaxpd:kv_pages_free"] == 23
    assert samples["jaxpd:compiled_programs"] == 2 and samples["jaxpd:num_requests_running"] == 0
    finished = [e for e in events if e.HasField("tokens") and e.tokens.finish_reason]
    assert len(finished) == 5
