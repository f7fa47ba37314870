"""The Python client and `jaxpd client`, against a real in-test gRPC server with a scripted fake.

The fake Generation servicer stands in for the router: it echoes the prompt's token ids back
one per chunk (text = the character for the id), honours max_tokens, stop tokens and strings,
Abort and cancellation, and validates max_tokens as the router does. It records every request,
so the tests can check what the client actually put on the wire.
"""

import concurrent.futures
import json
import re
import socket
import threading
import time

import grpc
import pytest

from jaxpd.cli import build_parser, main
from jaxpd.errors import JaxpdError
from jaxpd.serving.client import (Chunk, Client, ClientError, Finished, Timings, Usage, collect,
                                  make_request)
from jaxpd.v1 import generation_pb2, generation_pb2_grpc

OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed")
TIMINGS = generation_pb2.Timings(queue_s=0.001, prefill_s=0.002, transfer_s=0.003, ttft_s=0.004,
                                 total_s=0.005)


def _detok(token: int) -> str:
    return chr(token) if 32 <= token < 127 else f"<{token}>"


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """A scripted stand-in for the router."""

    def __init__(self):
        self.requests: list[generation_pb2.GenerateRequest] = []
        self.token_delay = 0.0
        self.cancelled = threading.Event()
        self.cancelled_ids: list[str] = []
        self.abort_requested: set[str] = set()
        self.in_flight: set[str] = set()
        self._count = 0
        self._lock = threading.Lock()

    def _request_id(self, request) -> str:
        with self._lock:
            self._count += 1
            return request.request_id or f"fake-{self._count}"

    def Generate(self, request, context):
        self.requests.append(request)
        s = request.sampling
        max_tokens = s.max_tokens if s.HasField("max_tokens") else 16
        if max_tokens < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"sampling.max_tokens: must be >= 1, got {max_tokens}")
        prompt = ([ord(c) for c in request.prompt] if request.WhichOneof("input") == "prompt"
                  else list(request.prompt_token_ids.ids))
        rid = self._request_id(request)
        self.in_flight.add(rid)
        try:
            yield from self._tokens(request, context, rid, prompt, max_tokens)
        except GeneratorExit:  # grpc closes the stream mid-send when the client cancels
            self.cancelled_ids.append(rid)
            self.cancelled.set()
            raise
        finally:
            self.in_flight.discard(rid)

    def _tokens(self, request, context, rid, prompt, max_tokens):
        s = request.sampling
        complete = generation_pb2.Complete(finish_reason="length", timings=TIMINGS)
        count = 0
        for i in range(max_tokens):
            if self.token_delay:
                time.sleep(self.token_delay)
            if not context.is_active():
                self.cancelled_ids.append(rid)
                self.cancelled.set()
                return
            if rid in self.abort_requested:
                complete.finish_reason = "abort"
                break
            token = prompt[i % len(prompt)]
            text = _detok(token) if request.text_mode != generation_pb2.TEXT_MODE_NONE else ""
            if text in s.stop:
                complete.finish_reason, complete.matched_stop_str = "stop", text
                break
            count += 1
            yield generation_pb2.GenerateResponse(request_id=rid, chunk=generation_pb2.Chunk(
                token_ids=[token], text=text, logprobs=[-0.5 * (i + 1)] if s.logprobs else []))
            if token in s.stop_token_ids:
                complete.finish_reason, complete.matched_token_id = "stop", token
                break
        complete.usage.CopyFrom(generation_pb2.Usage(prompt_tokens=len(prompt),
                                                     completion_tokens=count, cached_tokens=1))
        yield generation_pb2.GenerateResponse(request_id=rid, complete=complete)

    def Abort(self, request, context):
        found = [r for r in request.request_ids if r in self.in_flight]
        self.abort_requested.update(found)
        return generation_pb2.AbortResponse(aborted=found)

    def Tokenize(self, request, context):
        return generation_pb2.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    def GetModelInfo(self, request, context):
        return generation_pb2.ModelInfo(model="default", vocab_size=128, max_context=256)

    def GetServerInfo(self, request, context):
        return generation_pb2.ServerInfo(version="test", mode="disaggregated", workers=[
            generation_pb2.WorkerInfo(role="prefill", tp=4, mesh={"dp": 1, "tp": 4})])

    def GetLoads(self, request, context):
        return generation_pb2.Loads(workers=[generation_pb2.WorkerLoad(role="decode", running=3)])


@pytest.fixture
def fake():
    servicer = FakeGeneration()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(0)


@pytest.fixture
def client(fake):
    with Client(fake.address, timeout=30) as c:
        yield c


# --- the Python client ----------------------------------------------------------------------

def test_generate_streams_chunks_then_finished(fake, client):
    events = list(client.generate(prompt_token_ids=[65, 66, 67], max_tokens=5, logprobs=True,
                                  request_id="r-1"))
    chunks, final = events[:-1], events[-1]
    assert all(isinstance(c, Chunk) for c in chunks)
    assert [c.token_ids for c in chunks] == [(65,), (66,), (67,), (65,), (66,)]
    assert "".join(c.text for c in chunks) == "ABCAB"
    assert [c.logprobs for c in chunks] == [(-0.5,), (-1.0,), (-1.5,), (-2.0,), (-2.5,)]
    assert all(c.request_id == "r-1" for c in events)
    arrivals = [e.arrival_s for e in events]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert final == Finished(request_id="r-1", finish_reason="length", matched_stop=None,
                             usage=Usage(3, 5, 1), timings=Timings(0.001, 0.002, 0.003, 0.004, 0.005),
                             arrival_s=final.arrival_s)
    assert final.usage.total_tokens == 8


def test_complete_collects_text_usage_and_latency(fake, client):
    fake.token_delay = 0.02
    c = client.complete("Hi!", max_tokens=4)
    assert c.token_ids == (72, 105, 33, 72) and c.text == "Hi!H"
    assert c.finish_reason == "length" and c.matched_stop is None and c.logprobs == ()
    assert c.usage == Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=1)
    assert c.timings.ttft_s == pytest.approx(0.004) and c.request_id.startswith("fake-")
    assert 0 < c.ttft_s <= c.latency_s
    assert 0.015 < c.tpot_s < c.latency_s  # three gaps of ~20 ms between four tokens


def test_collect_uses_vllm_ttft_and_tpot_definitions():
    def chunk(ids, t):
        return Chunk("r", tuple(ids), "x" * len(ids), (), t)

    done = Finished("r", "length", None, Usage(2, 4), Timings(), 0.5)
    c = collect([chunk([], 0.05), chunk([1], 0.1), chunk([2], 0.2), chunk([3, 4], 0.4), done])
    assert c.ttft_s == pytest.approx(0.1)  # the first chunk carrying a token
    assert c.tpot_s == pytest.approx((0.4 - 0.1) / 3)
    assert c.latency_s == 0.5 and c.token_ids == (1, 2, 3, 4)
    one = collect([chunk([7], 0.1), done])
    assert one.ttft_s == pytest.approx(0.1) and one.tpot_s is None
    with pytest.raises(ClientError, match="without a Complete"):
        collect([chunk([1], 0.1)])


def test_unset_sampling_fields_are_not_sent(fake, client):
    client.complete(prompt_token_ids=[1, 2])
    sent = fake.requests[-1]
    assert sent.WhichOneof("input") == "prompt_token_ids" and list(sent.prompt_token_ids.ids) == [1, 2]
    assert not any(sent.sampling.HasField(f) for f in OPTIONAL_SAMPLING)
    assert not sent.sampling.stop and not sent.sampling.stop_token_ids
    assert not sent.sampling.ignore_eos and not sent.sampling.logprobs
    assert sent.request_id == "" and sent.text_mode == generation_pb2.TEXT_MODE_UNSPECIFIED

    # An explicit zero is sent (it differs from the server's default for max_tokens).
    client.complete("a", max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                    stop=["\n"], stop_token_ids=[9], ignore_eos=True, text=False)
    s = fake.requests[-1].sampling
    assert all(s.HasField(f) for f in OPTIONAL_SAMPLING)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (1, 0.0, 1.0, 0, 0)
    assert list(s.stop) == ["\n"] and list(s.stop_token_ids) == [9] and s.ignore_eos
    assert fake.requests[-1].text_mode == generation_pb2.TEXT_MODE_NONE


def test_stop_token_and_stop_string_are_reported(client):
    by_token = client.complete(prompt_token_ids=[65, 66, 67], max_tokens=10, stop_token_ids=[66])
    assert by_token.finish_reason == "stop" and by_token.matched_stop == 66
    assert by_token.token_ids == (65, 66)
    by_text = client.complete("abc", max_tokens=10, stop=["c"])
    assert (by_text.finish_reason, by_text.matched_stop, by_text.text) == ("stop", "c", "ab")


def test_make_request_needs_exactly_one_prompt():
    with pytest.raises(ValueError, match="exactly one"):
        make_request()
    with pytest.raises(ValueError, match="exactly one"):
        make_request("a", prompt_token_ids=[1])
    with pytest.raises(ValueError, match="seed"):
        make_request("a", seed=-1)
    with pytest.raises(TypeError, match="sequence of strings"):
        make_request("a", stop="\n")


def test_grpc_error_becomes_client_error_with_code(client):
    with pytest.raises(ClientError) as info:
        client.complete("a", max_tokens=0)
    e = info.value
    assert isinstance(e, JaxpdError)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details == "sampling.max_tokens: must be >= 1, got 0"
    assert str(e) == "INVALID_ARGUMENT: sampling.max_tokens: must be >= 1, got 0"


def test_deadline_is_a_client_error(fake):
    fake.token_delay = 0.05
    with Client(fake.address, timeout=0.2) as c:
        with pytest.raises(ClientError) as info:
            c.complete("a", max_tokens=1000)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_closing_the_stream_early_cancels_the_call(fake, client):
    fake.token_delay = 0.02
    stream = client.generate(prompt_token_ids=[1], max_tokens=100_000, request_id="long")
    assert isinstance(next(stream), Chunk)
    stream.close()
    assert fake.cancelled.wait(5), "the server never saw the call cancelled"
    assert fake.cancelled_ids == ["long"]


def test_abort_ends_the_stream_with_abort(fake, client):
    fake.token_delay = 0.01
    stream = client.generate(prompt_token_ids=[1], max_tokens=100_000, request_id="r")
    next(stream)
    assert client.abort("r") == ["r"]
    # "r" may still be finishing or already gone (timing); an unknown id is never reported
    assert client.abort(["r", "unknown"]) in (["r"], [])
    final = list(stream)[-1]
    assert isinstance(final, Finished) and final.finish_reason == "abort"
    assert client.abort(["r"]) == []


def test_unary_calls(client):
    assert client.tokenize("ab") == [97, 98]
    assert client.model_info().vocab_size == 128
    info = client.server_info()
    assert info.mode == "disaggregated" and dict(info.workers[0].mesh) == {"dp": 1, "tp": 4}
    assert client.loads().workers[0].running == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast():
    address = f"127.0.0.1:{_free_port()}"
    with Client(address) as c, pytest.raises(ClientError) as info:
        c.wait_ready(0.2)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(info.value) == f"cannot reach {address} (is `jaxpd serve` running?)"


# --- `jaxpd client` -------------------------------------------------------------------------

def test_cli_json_sends_prompts_concurrently_and_prints_in_order(fake, capsys):
    fake.token_delay = 0.01
    rc = main(["client", "--address", fake.address, "--prompt-ids", "65,66,67",
               "--prompt-ids", "68,69", "--max-tokens", "3", "--logprobs", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt_token_ids"] for r in records] == [[65, 66, 67], [68, 69]]
    assert [r["token_ids"] for r in records] == [[65, 66, 67], [68, 69, 68]]
    assert [r["text"] for r in records] == ["ABC", "DED"]
    first = records[0]
    assert set(first) == {"request_id", "prompt_token_ids", "token_ids", "text", "finish_reason",
                          "matched_stop", "usage", "timings", "ttft_s", "tpot_s", "logprobs"}
    assert first["finish_reason"] == "length" and first["matched_stop"] is None
    assert first["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "cached_tokens": 1,
                              "total_tokens": 6}
    assert first["timings"] == {"queue_s": 0.001, "prefill_s": 0.002, "transfer_s": 0.003,
                                "ttft_s": 0.004, "total_s": 0.005}
    assert first["ttft_s"] > 0 and first["tpot_s"] > 0 and first["logprobs"] == [-0.5, -1.0, -1.5]
    s = fake.requests[-1].sampling
    assert s.max_tokens == 3 and s.logprobs
    assert not any(s.HasField(f) for f in ("temperature", "top_p", "top_k", "seed"))


def test_cli_plain_streams_prompt_and_text_then_summary(fake, capsys):
    rc = main(["client", "--address", fake.address, "--prompt", "Hey", "--max-tokens", "4",
               "--temperature", "0.5", "--seed", "7", "--stop", "\n"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out == "HeyHeyH\n"
    assert re.fullmatch(r"finish_reason=length prompt_tokens=3 completion_tokens=4 "
                        r"ttft=\d+\.\d{3}s tpot=\d+\.\d{4}s\n", captured.err)
    s = fake.requests[-1].sampling
    assert (s.temperature, s.seed, list(s.stop)) == (0.5, 7, ["\n"])


def test_cli_grpc_error_exits_2_with_code_and_details(fake, capsys):
    rc = main(["client", "--address", fake.address, "--prompt-ids", "1", "--max-tokens", "0"])
    assert rc == 2
    assert capsys.readouterr().err == "error: INVALID_ARGUMENT: sampling.max_tokens: must be >= 1, got 0\n"


def test_cli_unreachable_server_exits_2(capsys):
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    rc = main(["client", "--address", address, "--prompt", "x", "--connect-timeout", "0.3"])
    assert rc == 2 and time.monotonic() - start < 5
    assert capsys.readouterr().err == f"error: cannot reach {address} (is `jaxpd serve` running?)\n"


def test_cli_help_describes_the_command():
    parser = build_parser()
    assert "client" in parser.format_help()
    client_parser = parser._subparsers._group_actions[0].choices["client"]
    text = client_parser.format_help()
    assert "examples:" in text and "--prompt-ids" in text and "127.0.0.1:50051" in text
