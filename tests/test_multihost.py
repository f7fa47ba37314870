"""A multi-host decode replica on real processes: `jaxpd serve` starts a decode group of one
replica spanning 2 processes of 2 host devices each (TP 4 across processes, jax.distributed
with gloo collectives) and a one-process prefill group, behind the router. Its streams must
equal the single-process engine's token for token, and killing either process of the replica
restarts both while every request finishes as if nothing had happened."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest

import serving_helpers as sh
from jaxpd.v1 import generation_pb2 as pb

pytestmark = pytest.mark.slow

FIXTURES = sh.REPO / "tests" / "fixtures" / "hf"
CHECKPOINT = FIXTURES / "llama"  # 2 KV heads: each host is sent its own one
CHUNK = 32  # prompts longer than this send their KV in several pieces


def _start(tmp_path_factory, checkpoint):
    config = sh.write_config(tmp_path_factory.mktemp("multihost") / "deploy.yaml",
                             model={"checkpoint": str(checkpoint)},
                             prefill={"devices": [0], "tp": 1, "replicas": 1},
                             decode={"devices": [0, 1], "tp": 4, "hosts": 2, "replicas": 1},
                             scheduler={"chunk_size": CHUNK, "max_prefill_tokens": 128},
                             kv={"page_size": 16, "num_pages": 96},
                             serving={"router": {"host": "127.0.0.1", "port": 0},
                                      "liveness_timeout_s": 3.0,
                                      "restart": {"attempts": 3, "backoff_s": 0.2}})
    return sh.start(config, verbose=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = _start(tmp_path_factory, CHECKPOINT)
    yield d
    assert d.stop() == 0, "\n".join(d.lines[-40:])


@pytest.fixture(scope="module")
def stub(served):
    return served.stub()


def _requests(tag: str) -> list[pb.GenerateRequest]:
    """Greedy and seeded requests; prompts from 5 to 70 tokens."""
    out = []
    for i, length in enumerate((5, 21, 40, 70)):
        sampling = pb.SamplingParams(max_tokens=40, ignore_eos=True)
        if i % 2:
            sampling.temperature, sampling.seed = 0.8, 7 + i
        req = pb.GenerateRequest(request_id=f"{tag}-{i}", sampling=sampling)
        req.prompt_token_ids.ids.extend((11 * i + 3 * k) % 300 + 2 for k in range(length))
        out.append(req)
    return out


_REFERENCE: dict = {}


def reference(requests, checkpoint=CHECKPOINT) -> list[list[int]]:
    """What the single-process engine (one device, in this test process) generates."""
    if checkpoint not in _REFERENCE:
        from jaxpd.config import parse_config
        from jaxpd.engine.builder import build_engine
        from jaxpd.engine.request import Request
        from jaxpd.engine.sampling import SamplingParams
        from jaxpd.model.checkpoint import load_model

        model = load_model(checkpoint)
        engine = build_engine(model.config, model.params,
                              parse_config({"kv": {"page_size": 16, "num_pages": 256}}))
        final = engine.run_to_completion([Request(r.request_id.rsplit("-", 1)[1], tuple(
            r.prompt_token_ids.ids), SamplingParams(
                max_tokens=r.sampling.max_tokens, temperature=r.sampling.temperature,
                seed=r.sampling.seed if r.sampling.HasField("seed") else None,
                ignore_eos=True)) for r in requests])
        _REFERENCE[checkpoint] = {rid: list(out.token_ids) for rid, out in final.items()}
    return [_REFERENCE[checkpoint][r.request_id.rsplit("-", 1)[1]] for r in requests]


def _stream_all(stub, requests, fault=None, after: float = 0.0):
    def one(req):
        tokens, complete = [], None
        for resp in stub.Generate(req, timeout=180):
            if resp.HasField("chunk"):
                tokens += resp.chunk.token_ids
            else:
                complete = resp.complete
        return tokens, complete
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(one, r) for r in requests]
        if fault is not None:
            time.sleep(after)
            fault()
        return [f.result() for f in futures]


def _replica_pids(served) -> dict[str, int]:
    """{"decode-0": pid, "decode-0-host1": pid} of the multi-host replica's processes."""
    out = {}
    for pid, cmdline in sh.child_pids(served.process.pid).items():
        if " serve decode " in cmdline:
            out["decode-0-host1" if "--host-index 1" in cmdline else "decode-0"] = pid
    return out


def test_streams_over_a_replica_spanning_two_processes_equal_the_single_process_engine(
        served, stub):
    info = sh.wait_all_serving(stub, within=30)
    assert set(info) == {"prefill-0", "decode-0"}  # the router sees one decode worker
    assert len(_replica_pids(served)) == 2
    requests = _requests("equal")
    results = _stream_all(stub, requests)
    assert [tokens for tokens, _ in results] == reference(requests)
    assert all(c.finish_reason == "length" and not c.migrations for _, c in results)
    ok, used = sh.wait_pages_free(stub, within=3.0)
    assert ok, used


def test_killing_one_process_restarts_the_replica_as_a_unit_and_loses_no_request(served, stub):
    """Host 1 dies mid-stream: host 0 notices on the step stream and exits, the launcher
    restarts both, the streams migrate and finish. (Host 0 dying instead ends host 1 at once:
    tests/test_step_stream.py; the launcher's unit restart: tests/test_launcher.py.)"""
    victim = "decode-0-host1"
    before = _replica_pids(served)
    requests = _requests(f"kill-{victim}")
    results = _stream_all(stub, requests, lambda: os.kill(before[victim], signal.SIGKILL),
                          after=1.0)
    assert [tokens for tokens, _ in results] == reference(requests)
    assert all(c.finish_reason == "length" for _, c in results)
    assert any(c.migrations for _, c in results)
    sh.wait_all_serving(stub, within=60)
    after = _replica_pids(served)
    assert set(after) == set(before) and not set(after.values()) & set(before.values())
    assert not any(sh.pid_alive(p) and p not in after.values() for p in before.values())
    ok, used = sh.wait_pages_free(stub, within=3.0)
    assert ok, used
    assert any("restarting the replica as a unit" in line for line in served.lines)

