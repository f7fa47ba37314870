"""`jaxpd serve` beyond the default deployment: the colocated mode, and start-up errors that
name the config key to fix."""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

import serving_helpers as sh
from conftest import first_programs_only
from jaxpd.model.checkpoint import load_model
from test_engine import naive_greedy
from jaxpd.v1 import generation_pb2 as pb, generation_pb2_grpc


@pytest.mark.slow
def test_colocated_deployment_with_tls_mtls_and_a_token_serves_the_same_tokens(tmp_path):
    """The colocated mode (TP 2, FP8 weights) behind TLS on the public port, mutual TLS between
    router and worker, and a bearer token: a client with the CA and the token gets the offline
    FP8 engine's tokens; without the
    token it gets UNAUTHENTICATED; without TLS, or with a certificate of another CA on the
    worker's port, it gets nothing at all."""
    from certs import CA
    from jaxpd.config import parse_config
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams
    from jaxpd.model.checkpoint import load_model
    from jaxpd.serving.client import Client, ClientError
    from jaxpd.tokenizer import merge_tokenizer_eos, tokenizer_for_checkpoint
    from jaxpd.v1 import worker_pb2, worker_pb2_grpc

    ca, rogue = CA("jaxpd-test"), CA("someone-else")
    (tmp_path / "token").write_text("s3cret-token\n")
    config = tmp_path / "colocated.yaml"
    cfg = yaml.safe_load((sh.REPO / "configs" / "local-colocated.yaml").read_text())
    cfg["serving"]["router"]["port"] = 0
    cfg["serving"].update(tls=ca.write(tmp_path, "router"), internal_tls=ca.write(tmp_path, "node"),
                          auth_token_file=str(tmp_path / "token"))
    cfg["scheduler"]["chunk_size"] = 32
    cfg["model"]["weight_dtype"] = "float8_e4m3fn"
    config.write_text(yaml.safe_dump(cfg))
    prompts = [[5 + i] * n for i, n in enumerate((3, 40, 90))]
    d = sh.start(config, precompile="background", verbose=True)  # the default mode
    try:
        with Client(d.address, tls_ca=ca.pem(), token="s3cret-token", timeout=120) as client:
            info = client.server_info()
            assert info.mode == "colocated" and info.kv_transport == "none"
            assert [(w.role, w.tp) for w in info.workers] == [("colocated", 2)]
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                served = list(pool.map(
                    lambda p: list(client.complete(prompt_token_ids=p, max_tokens=12).token_ids), prompts))
            deadline = time.monotonic() + 2.0
            while any(w.kv_pages_used for w in client.loads().workers):
                assert time.monotonic() < deadline, client.loads()
                time.sleep(0.05)
        for token in (None, "wrong"):
            with Client(d.address, tls_ca=ca.pem(), token=token, timeout=10) as client:
                with pytest.raises(ClientError) as e:
                    client.complete(prompt_token_ids=[5], max_tokens=2)
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in str(e.value)
        with Client(d.address, timeout=5) as plain, pytest.raises(ClientError) as e:
            plain.complete(prompt_token_ids=[5], max_tokens=2)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        worker = info.workers[0].address
        for cert, key in (rogue.issue("intruder"), (None, None)):
            creds = grpc.ssl_channel_credentials(ca.pem(), key, cert)
            stub = worker_pb2_grpc.DecodeWorkerStub(grpc.secure_channel(worker, creds))
            with pytest.raises(grpc.RpcError) as e:
                stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5, metadata=sh.INTERNAL)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
        # serving began with two programs; requests of other shapes did not wait for one
        assert any("2 first step programs compiled" in line for line in d.lines), d.lines[-30:]
        assert sh.step_compiles_on_request_path(d.lines) == []
    finally:
        assert d.stop() == 0, "\n".join(d.lines[-30:])
    model = load_model(weight_dtype="float8_e4m3fn")
    engine = first_programs_only(build_engine(
        merge_tokenizer_eos(model.config, tokenizer_for_checkpoint(model.folder)), model.params,
        parse_config({"kv": {"num_pages": 256}})))
    expected = engine.run_to_completion(
        [Request(str(i), tuple(p), SamplingParams(max_tokens=12)) for i, p in enumerate(prompts)])
    assert served == [list(expected[str(i)].token_ids) for i in range(len(prompts))]


def _serve(config, timeout=60):
    return subprocess.run([sys.executable, "-m", "jaxpd.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, env=sh.child_env(),
                          cwd=sh.REPO)


@pytest.mark.parametrize("section, key", [("serving", "serving.router.port"), ("decode", "decode.port")])
def test_port_in_use_names_the_key(tmp_path, section, key):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        override = ({"router": {"host": "127.0.0.1", "port": port}} if section == "serving"
                    else {"devices": [2], "tp": 1, "port": port})
        result = _serve(sh.write_config(tmp_path / "busy.yaml", **{section: override}))
    assert result.returncode == 2
    assert f"busy.yaml: {key}: 127.0.0.1:{port} is already in use" in result.stderr


def test_config_errors_and_role_mismatch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("serving: {router: {prot: 5}}\n")
    result = _serve(bad)
    assert result.returncode == 2 and "bad.yaml: serving.router.prot: unknown key" in result.stderr
    config = sh.write_config(tmp_path / "ok.yaml")
    result = subprocess.run([sys.executable, "-m", "jaxpd.cli", "serve", "colocated", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            env=sh.child_env(), cwd=sh.REPO)
    assert result.returncode == 2 and "role 'colocated' needs mode: colocated" in result.stderr
    result = subprocess.run([sys.executable, "-m", "jaxpd.cli", "serve", "router", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            env=sh.child_env(), cwd=sh.REPO)
    assert result.returncode == 2 and "prefill.port: set the workers' port" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _role(role: str, config, replica: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxpd.cli", "serve", role, "--config",
                             str(config), "--replica", str(replica)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=sh.child_env(), cwd=sh.REPO)


def _ready(proc: subprocess.Popen, timeout: float = 180) -> str:
    """The address from a role's JAXPD_READY line (its other output is drained)."""
    found = []
    done = threading.Event()

    def read():
        for line in proc.stdout:
            if line.startswith("JAXPD_READY ") and not found:
                found.append(json.loads(line.split(" ", 1)[1])["address"])
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout) and found, f"role exited with {proc.poll()}"
    return found[0]


@pytest.mark.slow
def test_roles_started_one_by_one_and_the_router_notices_a_worker_down(tmp_path):
    """Multi-host style: each role its own `jaxpd serve ROLE`, found through the config's ports.
    The KV goes through JAX's transfer server (serving.transport: jax: the decode worker pulls
    the prefill worker's device buffers) and the tokens are the greedy reference's. The router
    reports NOT_SERVING while its only decode worker is down (a restarted worker's return is
    tested on the full deployment, tests/test_serving.py)."""
    config = sh.write_config(tmp_path / "roles.yaml",
                             prefill={"devices": [0, 1], "tp": 2, "port": _free_port()},
                             decode={"devices": [2], "tp": 1, "port": _free_port()},
                             serving={"router": {"host": "127.0.0.1", "port": _free_port()},
                                      "transport": "jax"})
    procs = {"prefill": _role("prefill", config), "decode": _role("decode", config)}
    try:
        for name in ("prefill", "decode"):
            _ready(procs[name])
        procs["router"] = _role("router", config)
        address = _ready(procs["router"])
        stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(address))
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))

        def status():
            return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status

        def generate():
            req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4))
            req.prompt_token_ids.ids.extend([5, 6, 7])
            return [t for r in stub.Generate(req, timeout=60) for t in r.chunk.token_ids]

        first = generate()
        assert first == naive_greedy(load_model(), (5, 6, 7), 4)
        assert status() == health_pb2.HealthCheckResponse.SERVING
        procs["decode"].terminate()
        procs["decode"].wait(30)
        assert _eventually(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as e:
            generate()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # stopped (down), or still finishing its drain when asked: never "starting"
        assert re.search(r"no decode worker is serving \(decode-0 is (down|draining)\)",
                         e.value.details()), e.value.details()
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            assert proc.wait(30) is not None


def _eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False
