"""The gRPC service end to end: `jaxpd serve` starts a router, a prefill worker (TP=2) and a
decode worker (TP=1) as separate processes on loopback; clients talk to the router only."""

from __future__ import annotations

import concurrent.futures
import json
import random
import time

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

import serving_helpers as sh
from conftest import first_programs_only
from jaxpd.v1 import generation_pb2 as pb, worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serving")]

CHUNK = 32  # prefill chunk: longer prompts stream their KV in several pieces


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = sh.write_config(tmp_path_factory.mktemp("serve") / "deploy.yaml",
                             scheduler={"chunk_size": CHUNK, "max_prefill_tokens": 256},
                             kv={"page_size": 16, "num_pages": 256},
                             serving={"router": {"host": "127.0.0.1", "port": 0},
                                      "record_kv_digests": True})
    d = sh.start(config, verbose=True)  # JAXPD_PRECOMPILE=first: two programs per worker, ever
    yield d
    if d.process.poll() is None:  # the last test kills a worker on purpose
        assert d.stop() == 0, "\n".join(d.lines[-40:])


@pytest.fixture(scope="module")
def stub(served):
    return served.stub()


@pytest.fixture(scope="module")
def offline():
    """The in-process engine on the same model: what every stream must equal."""
    from jaxpd.config import parse_config
    from jaxpd.engine.builder import build_engine
    from jaxpd.model.checkpoint import load_model
    from jaxpd.tokenizer import merge_tokenizer_eos, tokenizer_for_checkpoint

    model = load_model()
    config = merge_tokenizer_eos(model.config, tokenizer_for_checkpoint(model.folder))
    deployment = parse_config({"kv": {"page_size": 16, "num_pages": 512}})
    return lambda: first_programs_only(build_engine(config, model.params, deployment))


def _request(ids=None, prompt=None, rid="", text_mode=0, **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=rid, sampling=pb.SamplingParams(**sampling),
                             text_mode=text_mode)
    if prompt is not None:
        req.prompt = prompt
    if ids is not None:
        req.prompt_token_ids.ids.extend(ids)
    return req


def _collect(stub, req, timeout=120):
    tokens, text, complete = [], "", None
    for resp in stub.Generate(req, timeout=timeout):
        if resp.HasField("chunk"):
            tokens += resp.chunk.token_ids
            text += resp.chunk.text
        else:
            complete = resp.complete
    return tokens, text, complete


def _workers(stub):
    return {f"{w.role}-{w.replica}": w for w in stub.GetServerInfo(pb.GetServerInfoRequest()).workers}


def test_health_and_server_info(served, stub):
    health = health_pb2_grpc.HealthStub(served.channel())
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.mode == "disaggregated" and info.kv_transport == "grpc"
    workers = _workers(stub)
    assert workers["prefill-0"].tp == 2 and workers["decode-0"].tp == 1
    assert workers["prefill-0"].pid != workers["decode-0"].pid
    model = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert model.vocab_size == 4096 and model.has_tokenizer and model.fingerprint
    assert stub.Tokenize(pb.TokenizeRequest(text="Mr. Darcy")).token_ids


def test_concurrent_streams_equal_the_offline_engine_and_kv_bytes_match(served, stub, offline):
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams

    rng = random.Random(7)
    lengths = [1, 5, 17, 33, 64, 100, 150, 200]  # mixed, several over one chunk
    max_tokens = [1, 24, 9, 16, 3, 20, 12, 8]
    prompts = [[rng.randrange(2, 4096) for _ in range(n)] for n in lengths]
    ids = [f"mix-{i}" for i in range(len(prompts))]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda a: _collect(stub, _request(a[0], rid=a[1], max_tokens=a[2])),
                                zip(prompts, ids, max_tokens)))
    expected = offline().run_to_completion(
        [Request(rid, tuple(p), SamplingParams(max_tokens=m)) for rid, p, m in zip(ids, prompts, max_tokens)])
    for rid, prompt, (tokens, _, complete) in zip(ids, prompts, results):
        assert tokens == list(expected[rid].token_ids), rid
        assert complete.finish_reason == expected[rid].finish_reason
        assert complete.usage.prompt_tokens == len(prompt)
        assert complete.usage.completion_tokens == len(tokens)
        t = complete.timings
        assert 0 <= t.queue_s < t.ttft_s and 0 < t.prefill_s < t.ttft_s <= t.total_s, t
        assert t.transfer_s >= 0
    # The KV bytes the decode worker holds equal the bytes the prefill worker computed.
    workers = _workers(stub)
    digests = {}
    for role in ("prefill-0", "decode-0"):
        worker = worker_pb2_grpc.PrefillWorkerStub if role.startswith("prefill") else worker_pb2_grpc.DecodeWorkerStub
        channel = grpc.insecure_channel(workers[role].address)
        digests[role] = worker(channel).GetKVDigests(worker_pb2.KVDigestsRequest(request_ids=ids)).digests
    transferred = [rid for rid, m in zip(ids, max_tokens) if m > 1 and len(results[ids.index(rid)][0]) > 1]
    assert len(transferred) >= 6
    for rid in transferred:
        p, d = digests["prefill-0"][rid], digests["decode-0"][rid]
        assert (p.crc32c, p.bytes, p.num_tokens) == (d.crc32c, d.bytes, d.num_tokens), rid
        assert p.num_tokens == lengths[ids.index(rid)]
    ok, used = sh.wait_pages_free(stub, within=1.0)
    assert ok, used
    # Every worker compiled one step program before serving (batch 1: a 16-token chunk, a
    # decode call); 8 concurrent prompts of up to 200 tokens ran in chunks and rows that fit
    # them, and JAX's compile hook saw no step program compile on the request path.
    started = [line for line in served.lines if "1 first step programs compiled" in line]
    assert len(started) == 2, started
    assert sh.step_compiles_on_request_path(served.lines) == []


BAD = [
    (dict(ids=[]), "prompt_token_ids.ids: is empty"),
    (dict(prompt=""), "prompt: is empty"),
    (dict(), "input: give either"),
    (dict(ids=[5], max_tokens=1024), "sampling.max_tokens: the prompt (1 tokens) + max_tokens (1024) exceeds"),
    (dict(ids=[5], max_tokens=0), "sampling.max_tokens: must be >= 1"),
    (dict(ids=[5], temperature=-0.5), "sampling.temperature: must be >= 0"),
    (dict(ids=[5], top_p=0.0), "sampling.top_p: must be in (0, 1]"),
    (dict(ids=[5], top_p=1.5), "sampling.top_p: must be in (0, 1]"),
    (dict(ids=[5], top_k=-1), "sampling.top_k: must be >= 0"),
    (dict(ids=[5, 4096]), "prompt_token_ids.ids[1]: token id 4096 is outside the vocabulary"),
    (dict(ids=[-3]), "prompt_token_ids.ids[0]: token id -3 is outside the vocabulary"),
    (dict(ids=[5], stop_token_ids=[99999]), "sampling.stop_token_ids[0]"),
    (dict(ids=[5], text_mode=7), "text_mode: unknown value 7"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_the_field(stub, fields, message):
    with pytest.raises(grpc.RpcError) as e:
        _collect(stub, _request(**fields), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_server_keeps_serving_after_bad_input(stub):
    for fields, _ in BAD:
        with pytest.raises(grpc.RpcError):
            _collect(stub, _request(**fields), timeout=30)
    tokens, text, complete = _collect(stub, _request(prompt="Mr. Darcy", max_tokens=5))
    assert complete.finish_reason in ("length", "stop") and tokens


def test_duplicate_request_id_is_refused(stub):
    calls = stub.Generate(_request([5, 6, 7], rid="twice", max_tokens=300, ignore_eos=True))
    next(calls)
    with pytest.raises(grpc.RpcError) as e:
        _collect(stub, _request([5], rid="twice", max_tokens=2))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    calls.cancel()


def test_cancel_mid_stream_frees_pages_on_both_workers(stub):
    call = stub.Generate(_request(list(range(10, 90)), max_tokens=600, ignore_eos=True))
    got = [next(call), next(call)]
    assert all(r.HasField("chunk") for r in got)
    assert any(pages_used for pages_used in sh.pages_in_use(stub).values())
    call.cancel()
    ok, used = sh.wait_pages_free(stub, within=1.0)
    assert ok, used


def test_expired_deadline_frees_pages(stub):
    with pytest.raises(grpc.RpcError) as e:
        _collect(stub, _request(list(range(10, 200)), max_tokens=800, ignore_eos=True), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ok, used = sh.wait_pages_free(stub, within=1.0)
    assert ok, used


def test_abort_ends_the_stream_with_abort(stub):
    call = stub.Generate(_request([7, 8, 9], rid="to-abort", max_tokens=600, ignore_eos=True))
    next(call)
    assert stub.Abort(pb.AbortRequest(request_ids=["to-abort", "unknown"])).aborted == ["to-abort"]
    last = list(call)[-1]
    assert last.complete.finish_reason == "abort"
    ok, used = sh.wait_pages_free(stub, within=1.0)
    assert ok, used


def test_stop_string_and_stop_token(stub):
    prompt = "It is a truth universally acknowledged, that"
    tokens, text, _ = _collect(stub, _request(prompt=prompt, max_tokens=24))
    word = text.split()[2]
    cut_tokens, cut_text, complete = _collect(stub, _request(prompt=prompt, max_tokens=24, stop=[word]))
    assert complete.finish_reason == "stop" and complete.matched_stop_str == word
    assert word not in cut_text and text.startswith(cut_text)
    _, _, complete = _collect(stub, _request(prompt=prompt, max_tokens=24, stop_token_ids=[tokens[3]]))
    assert complete.finish_reason == "stop" and complete.matched_token_id == tokens[3]
    assert complete.usage.completion_tokens == tokens.index(tokens[3]) + 1


def test_stock_reflection_client_matches_offline_generate(served, capsys):
    """A client that knows only the server's reflection (no jaxpd stubs) streams Generate."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase)

    from jaxpd.cli import main

    channel = grpc.insecure_channel(served.address)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("jaxpd.v1.Generation").FindMethodByName("Generate")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    prompt = "It is a truth universally acknowledged, that"
    request = json_format.ParseDict({"prompt": prompt, "sampling": {"maxTokens": 24, "temperature": 0}},
                                    request_cls())
    generate = channel.unary_stream("/jaxpd.v1.Generation/Generate",
                                    request_serializer=request_cls.SerializeToString,
                                    response_deserializer=response_cls.FromString)
    streamed = []
    for resp in generate(request, timeout=60):
        streamed += json_format.MessageToDict(resp).get("chunk", {}).get("tokenIds", [])
    assert main(["generate", "--prompt", prompt, "--max-tokens", "24", "--temperature", "0", "--json"]) == 0
    offline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert streamed == offline["token_ids"]


def test_loads_report_every_worker(stub):
    loads = stub.GetLoads(pb.GetLoadsRequest()).workers
    assert sorted(f"{w.role}-{w.replica}" for w in loads) == ["decode-0", "prefill-0"]
    assert all(w.kv_pages_total == 255 and w.kv_pages_free + w.kv_pages_used == 255 for w in loads)


def test_a_dead_worker_stops_the_deployment_and_is_named(served, stub):
    """Runs last: kills the decode worker; the launcher reports it and stops the rest."""
    workers = _workers(stub)
    pids = [w.pid for w in workers.values()]
    import os
    import signal

    os.kill(workers["decode-0"].pid, signal.SIGKILL)
    code = served.process.wait(60)
    assert code != 0
    out = "\n".join(served.lines)
    assert "decode-0" in out and "SIGKILL" in out
    time.sleep(0.2)
    assert not any(sh.pid_alive(pid) for pid in pids)
