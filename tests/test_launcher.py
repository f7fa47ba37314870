"""The process supervisor with real child processes: small Python scripts that serve gRPC health
on 127.0.0.1 port 0 and print JAXPD_READY, or fail, hang, or ignore SIGTERM on purpose."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from jaxpd.errors import ConfigError, JaxpdError
from jaxpd.serving.devices import router_env, visible_devices_env, with_host_device_count
from jaxpd.serving.launcher import (
    ChildExitedError, LaunchError, LaunchInterrupted, Launcher, ProcessSpec, StartupTimeoutError,
    check_port_free, describe_status, handle_stop_signals, parse_ready_line, role_argv)

CHILD = textwrap.dedent('''
    import json, os, signal, sys, threading, time

    mode = sys.argv[1]
    extra = sys.argv[2:]

    def serve(status_name="SERVING"):
        from concurrent import futures
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servicer.set("", getattr(health_pb2.HealthCheckResponse, status_name))
        print("JAXPD_READY " + json.dumps({"address": f"127.0.0.1:{port}", "pid": os.getpid(),
                                           "extra": extra}), flush=True)
        return server

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    if mode == "serve":
        print("loading the model", flush=True)
        server = serve()
        stop.wait()
        server.stop(0)
    elif mode == "fail":
        for i in range(100):
            print(f"line {i}", flush=True)
        print("ValueError: the checkpoint is broken", file=sys.stderr, flush=True)
        sys.exit(3)
    elif mode == "hang":
        print("still loading", flush=True)
        stop.wait()
    elif mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server = serve()
        while True:
            time.sleep(1)
    elif mode == "not-serving":
        server = serve("NOT_SERVING")
        stop.wait()
    elif mode == "bad-ready":
        print("JAXPD_READY {not json", flush=True)
        stop.wait()
    elif mode == "compiling":  # compile progress lines, one of them garbled, then serve
        for done in (1, 2):
            print("JAXPD_PROGRESS " + json.dumps({"done": done, "total": 3, "seconds": done * 1.5,
                                                 "cache_hits": 0}), flush=True)
        print("JAXPD_PROGRESS {garbled", flush=True)
        server = serve()
        print("JAXPD_PROGRESS " + json.dumps({"done": 3, "total": 3, "seconds": 4.0,
                                             "cache_hits": 3}), flush=True)
        stop.wait()
        server.stop(0)
''')

# A launcher in its own process, for the kill -9 test: prints its child's pid, then waits.
ORPHAN_PARENT = textwrap.dedent('''
    import os, sys, time
    from jaxpd.serving.launcher import Launcher, ProcessSpec
    launcher = Launcher()
    pid = launcher.start(ProcessSpec("prefill-0", "prefill", 0,
                                     [sys.executable, sys.argv[1], "hang"], dict(os.environ)))
    print(pid, flush=True)
    time.sleep(60)
''')


@pytest.fixture(scope="module")
def child_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("children") / "child.py"
    path.write_text(CHILD)
    return path


def spec(script: Path, name: str, mode: str, *extra: str) -> ProcessSpec:
    role, _, replica = name.rpartition("-")
    return ProcessSpec(name, role, int(replica), [sys.executable, str(script), mode, *extra],
                       dict(os.environ))


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie holds no port and no device)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for_line(launcher: Launcher, name: str, text: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in launcher.last_lines(name)):
        assert time.monotonic() < deadline, f"{name} never printed {text!r}"
        time.sleep(0.02)


def wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


# -- readiness -------------------------------------------------------------------------------------
def test_staged_start_returns_addresses_and_echoes(child_script):
    echo = io.StringIO()
    with Launcher(echo=echo, grace_s=5) as launcher:
        launcher.start(spec(child_script, "prefill-0", "serve"))
        launcher.start(spec(child_script, "decode-0", "serve"))
        workers = launcher.wait_ready(["prefill-0", "decode-0"], timeout_s=15)
        addresses = [workers["prefill-0"]["address"], workers["decode-0"]["address"]]
        assert all(a.startswith("127.0.0.1:") for a in addresses) and len(set(addresses)) == 2
        launcher.start(spec(child_script, "router-0", "serve", *addresses))
        router = launcher.wait_ready(["router-0"], timeout_s=15)["router-0"]
        assert router["extra"] == addresses  # the router got the workers' addresses
        pids = launcher.pids()
        launcher.request_stop()
        assert launcher.serve_forever() is None
    assert not any(alive(pid) for pid in pids.values())
    assert "[prefill-0] loading the model" in echo.getvalue()
    assert "[router-0] JAXPD_READY " in echo.getvalue()


def test_child_exit_during_startup_is_reported_and_others_stopped(child_script):
    with Launcher(grace_s=5) as launcher:
        launcher.start(spec(child_script, "decode-0", "serve"))
        launcher.start(spec(child_script, "prefill-0", "fail"))
        pids = launcher.pids()
        with pytest.raises(ChildExitedError) as info:
            launcher.wait_ready(timeout_s=15)
    error = info.value
    message = str(error)
    assert message.startswith("prefill-0 (role prefill, replica 0) exited with status 3\n")
    assert (error.name, error.role, error.replica) == ("prefill-0", "prefill", 0)
    assert error.returncode == 3
    assert "ValueError: the checkpoint is broken" in message  # stderr is in the log too
    assert "line 99" in message and "line 61" in message
    assert "line 60\n" not in message  # only the last 40 lines are kept
    assert len(error.exits[0].last_lines) == 40
    assert isinstance(error, JaxpdError)
    assert not any(alive(pid) for pid in pids.values())


def test_child_killed_while_serving_is_reported(child_script):
    launcher = Launcher(grace_s=5)
    with launcher:
        launcher.start(spec(child_script, "prefill-0", "serve"))
        launcher.start(spec(child_script, "decode-0", "serve"))
        ready = launcher.wait_ready(timeout_s=15)
        pids = launcher.pids()
        os.kill(pids["decode-0"], signal.SIGKILL)
        with pytest.raises(ChildExitedError) as info:
            launcher.serve_forever()
    assert str(info.value).startswith(
        "decode-0 (role decode, replica 0) was killed by signal SIGKILL\n")
    assert "JAXPD_READY" in str(info.value)  # its last lines
    assert "while serving" in str(info.value)
    assert not any(alive(pid) for pid in pids.values())
    # the port is released with the process
    host, port = ready["prefill-0"]["address"].split(":")
    check_port_free(host, int(port), "prefill.port", "deploy.yaml")


def test_sigterm_stops_everything_within_the_grace_period(child_script):
    before = signal.getsignal(signal.SIGTERM)
    launcher = Launcher(grace_s=1.0)
    with launcher, handle_stop_signals(launcher):
        launcher.start(spec(child_script, "prefill-0", "serve"))
        launcher.start(spec(child_script, "decode-0", "stubborn"))  # ignores SIGTERM
        launcher.wait_ready(timeout_s=15)
        pids = launcher.pids()
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        assert launcher.serve_forever() == signal.SIGTERM
        elapsed = time.monotonic() - started
        codes = launcher.returncodes()
    assert elapsed < 1.0 + 2.0
    assert codes["prefill-0"] == 0  # stopped cleanly on SIGTERM
    assert codes["decode-0"] == -signal.SIGKILL  # escalated after the grace period
    assert not any(alive(pid) for pid in pids.values())
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_startup_timeout_names_who_is_not_ready(child_script):
    with Launcher(grace_s=5) as launcher:
        launcher.start(spec(child_script, "prefill-0", "serve"))
        launcher.start(spec(child_script, "decode-0", "hang"))
        launcher.start(spec(child_script, "decode-1", "not-serving"))
        pids = launcher.pids()
        wait_for_line(launcher, "decode-0", "still loading")  # so the outcome is not a race
        wait_for_line(launcher, "decode-1", "JAXPD_READY")
        with pytest.raises(StartupTimeoutError) as info:
            launcher.wait_ready(timeout_s=1.5)
    message = str(info.value)
    assert info.value.not_ready == ["decode-0", "decode-1"]
    assert message.startswith(
        "not ready after 1.5 s (serving.startup_timeout_s): decode-0, decode-1\n")
    assert "decode-0 (role decode, replica 0): never printed its JAXPD_READY line" in message
    assert "still loading" in message
    assert "decode-1 (role decode, replica 1): health check on 127.0.0.1:" in message
    assert "NOT_SERVING" in message
    assert "prefill-0" not in message.split("\n", 1)[1]
    assert not any(alive(pid) for pid in pids.values())


def test_stop_request_during_startup_interrupts(child_script):
    with Launcher(grace_s=5) as launcher:
        launcher.start(spec(child_script, "prefill-0", "hang"))
        pid = launcher.pids()["prefill-0"]
        threading.Timer(0.3, launcher.request_stop, (signal.SIGINT,)).start()
        with pytest.raises(LaunchInterrupted) as info:
            launcher.wait_ready(timeout_s=15)
    assert info.value.signum == signal.SIGINT and info.value.not_ready == ["prefill-0"]
    assert "SIGINT" in str(info.value)
    assert not alive(pid)


def test_bad_ready_line_and_bad_command(child_script, tmp_path):
    with Launcher(grace_s=5) as launcher:
        launcher.start(spec(child_script, "router-0", "bad-ready"))
        pid = launcher.pids()["router-0"]
        with pytest.raises(LaunchError, match="router-0 .* printed a bad ready line"):
            launcher.wait_ready(timeout_s=15)
    assert not alive(pid)
    with Launcher() as launcher:
        with pytest.raises(LaunchError, match="could not start prefill-0"):
            launcher.start(ProcessSpec("prefill-0", "prefill", 0, [str(tmp_path / "nope")], {}))


def test_children_die_when_the_launcher_is_killed(child_script):
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_PARENT, str(child_script)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        child_pid = int(parent.stdout.readline())
        assert alive(child_pid)
        parent.kill()
        parent.wait()
        assert wait_gone(child_pid), "the child outlived its launcher (PR_SET_PDEATHSIG)"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_helpers():
    assert describe_status(1) == "exited with status 1"
    assert describe_status(-9) == "was killed by signal SIGKILL"
    assert parse_ready_line('JAXPD_READY {"address": "h:1"}') == ({"address": "h:1"}, None)
    assert parse_ready_line('JAXPD_READY {"port": 1}')[1] is not None
    assert role_argv("decode", "c.yaml", 1)[1:] == ["-m", "jaxpd.cli", "serve", "decode",
                                                    "--config", "c.yaml", "--replica", "1"]
    from jaxpd.serving.process import READY_PREFIX
    from jaxpd.serving.launcher import READY_PREFIX as LAUNCHER_PREFIX
    assert READY_PREFIX == LAUNCHER_PREFIX


# -- ports -----------------------------------------------------------------------------------------
def test_check_port_free():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            check_port_free("127.0.0.1", port, "serving.router.port", "deploy.yaml")
        assert str(info.value).startswith(
            f"deploy.yaml: serving.router.port: 127.0.0.1:{port} is already in use")
    check_port_free("127.0.0.1", port, "serving.router.port", "deploy.yaml")  # released
    check_port_free("127.0.0.1", 0, "serving.router.port", "deploy.yaml")  # 0: any free port


def test_two_groups_giving_one_port_twice_are_refused_before_anything_starts():
    """`jaxpd serve` on one machine: decode[0] (replicas 2 from port P) and decode[1] (port
    P + 1) would both listen on P + 1; the error names the key and both workers."""
    from jaxpd.config import parse_config
    from jaxpd.serving.serve_cli import _check_ports, _worker_roles

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = parse_config({"mode": "disaggregated", "prefill": {"devices": [0]},
                        "serving": {"router": {"port": 0}},
                        "decode": [{"devices": [1, 2], "replicas": 2, "port": port},
                                   {"devices": [3], "port": port + 1}]})
    with pytest.raises(ConfigError) as info:
        _check_ports(cfg, "deploy.yaml", _worker_roles(cfg))
    assert str(info.value) == (f"deploy.yaml: decode[1].port: decode-2 would listen on port "
                               f"{port + 1}, which decode[0].port gives another worker (replica "
                               f"i of a group uses port + i)")


def test_check_port_free_tolerates_time_wait_of_a_previous_run():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end lingers in TIME_WAIT
        time.sleep(0.05)
        client.close()
    check_port_free("127.0.0.1", port, "prefill.port", "deploy.yaml")


# -- devices ---------------------------------------------------------------------------------------
def test_visible_devices_env_sets_every_platform():
    env = visible_devices_env([4, 5], {"PATH": "/bin", "XLA_FLAGS": "--xla_dump_to=/tmp/x "
                                       "--xla_force_host_platform_device_count=8"})
    assert env["PATH"] == "/bin"
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert env["TPU_VISIBLE_CHIPS"] == "4,5"
    assert env["TPU_PROCESS_BOUNDS"] == "1,1,1"
    assert env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,2,1"
    assert env["TPU_PROCESS_PORT"] == "8480"
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"


@pytest.mark.parametrize("count,bounds", [(1, "1,1,1"), (2, "1,2,1"), (4, "2,2,1"),
                                          (8, "2,4,1"), (3, None)])
def test_tpu_chip_bounds(count, bounds):
    env = visible_devices_env(list(range(count)), {})
    assert env.get("TPU_CHIPS_PER_PROCESS_BOUNDS") == bounds
    assert env["TPU_VISIBLE_CHIPS"] == ",".join(str(i) for i in range(count))


def test_visible_devices_env_respects_the_users_settings():
    base = {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c,GPU-d", "TPU_VISIBLE_CHIPS": "4,5,6,7",
            "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,3,1"}
    env = visible_devices_env([1, 3], base)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-b,GPU-d"  # indices into the user's own list
    assert env["TPU_VISIBLE_CHIPS"] == "5,7"
    assert env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,3,1"  # the user's bounds win
    assert base["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b,GPU-c,GPU-d"  # not mutated
    with pytest.raises(ConfigError, match="device 4 is not visible: CUDA_VISIBLE_DEVICES="):
        visible_devices_env([4], base)
    hidden = visible_devices_env([0], {"CUDA_VISIBLE_DEVICES": "", "TPU_VISIBLE_CHIPS": ""})
    assert hidden["CUDA_VISIBLE_DEVICES"] == "" and hidden["TPU_VISIBLE_CHIPS"] == ""
    assert "TPU_PROCESS_BOUNDS" not in hidden


def test_visible_devices_env_follows_jax_platforms():
    cpu = visible_devices_env([2], {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0"})
    assert cpu["CUDA_VISIBLE_DEVICES"] == "0" and "TPU_VISIBLE_CHIPS" not in cpu
    assert cpu["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
    gpu = visible_devices_env([0, 1], {"JAX_PLATFORMS": "cuda"})
    assert gpu["CUDA_VISIBLE_DEVICES"] == "0,1" and "XLA_FLAGS" not in gpu
    with pytest.raises(ConfigError):
        visible_devices_env([], {})
    with pytest.raises(ConfigError):
        visible_devices_env([1, 1], {})


def test_router_env_and_host_flags():
    env = router_env({"JAX_PLATFORMS": "cuda", "HOME": "/h"})
    assert env == {"JAX_PLATFORMS": "cpu", "HOME": "/h"}
    assert with_host_device_count("", 3) == "--xla_force_host_platform_device_count=3"
    assert with_host_device_count("--xla_force_host_platform_device_count=8 --a=1", 2) == \
        "--a=1 --xla_force_host_platform_device_count=2"


def test_compile_progress_lines_are_parsed_and_not_kept_as_log(child_script):
    from jaxpd.serving.compile_view import CompileView

    out = io.StringIO()
    with Launcher() as launcher:
        launcher.start(spec(child_script, "prefill-0", "compiling"))
        view = CompileView(launcher.compile_progress, out, expect=["prefill-0"],
                           plain_interval_s=0.0)
        launcher.wait_ready(timeout_s=30, on_tick=view.tick)
        wait_for_line(launcher, "prefill-0", "JAXPD_READY")
        deadline = time.monotonic() + 10
        while launcher.compile_progress()["prefill-0"]["done"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        view.tick()
        lines = launcher.last_lines("prefill-0")
    assert launcher.compile_progress()["prefill-0"]["cache_hits"] == 3
    assert "JAXPD_PROGRESS {garbled" in lines  # not progress: kept as a log line
    assert not [line for line in lines if line.startswith("JAXPD_PROGRESS {\"")]
    shown = out.getvalue().splitlines()
    assert shown[-1] == "jaxpd: compiled  prefill-0 3/3 4.0 s (cache warm)" and view.finished
    assert any(line.startswith("jaxpd: compiling  prefill-0 ") for line in shown[:-1])


# -- restarts ------------------------------------------------------------------------------------
def _serve_in_thread(launcher: Launcher, **kwargs):
    """serve_forever on a helper thread, so the test's thread is free to kill children;
    (thread, result dict)."""
    result: dict = {}

    def run():
        try:
            result["signal"] = launcher.serve_forever(**kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the test
            result["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_a_dead_child_is_restarted_and_serves_again_while_the_others_keep_running(child_script):
    from jaxpd.serving.launcher import RestartPolicy

    launcher = Launcher(poll_s=0.02)
    lines: list[str] = []
    with launcher:
        launcher.start(spec(child_script, "decode-0", "serve"))
        launcher.start(spec(child_script, "decode-1", "serve"))
        launcher.wait_ready(timeout_s=30)
        first, other = launcher.pids()["decode-0"], launcher.pids()["decode-1"]
        thread, result = _serve_in_thread(launcher, restart=RestartPolicy(attempts=2, backoff_s=0.05),
                                          report=lines.append)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not any("serves again" in line for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        assert launcher.pids()["decode-0"] != first and alive(launcher.pids()["decode-0"])
        assert launcher.pids()["decode-1"] == other and alive(other)
        assert launcher.restarts() == {"decode-0": 1}
        assert "killed by signal SIGKILL; restarting it" in lines[0]
        launcher.request_stop(signal.SIGTERM)
        thread.join(15)
        assert result == {"signal": signal.SIGTERM}


def test_when_restarts_run_out_everything_stops_and_the_child_is_named(child_script):
    from jaxpd.serving.launcher import RestartPolicy

    launcher = Launcher(poll_s=0.02)
    with launcher:
        launcher.start(spec(child_script, "prefill-0", "serve"))
        launcher.start(spec(child_script, "router-0", "serve"))
        launcher.wait_ready(timeout_s=30)
        router = launcher.pids()["router-0"]
        # every restart of prefill-0 fails at once: its spec now runs the failing mode
        launcher._children["prefill-0"].spec = spec(child_script, "prefill-0", "fail")
        thread, result = _serve_in_thread(launcher, restart=RestartPolicy(attempts=2, backoff_s=0.05))
        os.kill(launcher.pids()["prefill-0"], signal.SIGKILL)
        thread.join(30)
        error = result["error"]
        assert isinstance(error, ChildExitedError) and error.name == "prefill-0"
        assert "exited with status 3" in str(error) and "restarted 2 times in a row" in str(error)
        assert wait_gone(router)


def test_the_hosts_of_a_multi_host_replica_stop_and_restart_as_a_unit(child_script):
    """A follower host dies: its leader is stopped too and both restart; the follower counts
    as serving again once its leader does; another replica is untouched."""
    from jaxpd.serving.launcher import RestartPolicy

    def host(name: str, mode: str, index: int) -> ProcessSpec:
        return ProcessSpec(name, "decode", 0, [sys.executable, str(child_script), mode],
                           dict(os.environ), group="decode-0", host=index)

    launcher = Launcher(poll_s=0.02)
    lines: list[str] = []
    with launcher:
        launcher.start(host("decode-0", "serve", 0))
        launcher.start(host("decode-0-host1", "hang", 1))  # a follower prints no ready line
        launcher.start(spec(child_script, "decode-1", "serve"))
        launcher.wait_ready(["decode-0", "decode-1"], timeout_s=30)
        before = launcher.pids()
        thread, result = _serve_in_thread(launcher, restart=RestartPolicy(attempts=2, backoff_s=0.05),
                                          report=lines.append)
        os.kill(before["decode-0-host1"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not any("serves again" in line for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        after = launcher.pids()
        assert not alive(before["decode-0"]) and not alive(before["decode-0-host1"])
        assert alive(after["decode-0"]) and alive(after["decode-0-host1"])
        assert after["decode-1"] == before["decode-1"]
        assert launcher.restarts() == {"decode-0": 1, "decode-0-host1": 1}
        assert "stopped the other 1 host process(es) of replica decode-0" in lines[0]
        assert "restarting the replica as a unit" in lines[0]
        assert not launcher._children["decode-0-host1"].failures  # serving again with its leader
        launcher.request_stop(signal.SIGTERM)
        thread.join(15)
        assert result == {"signal": signal.SIGTERM}


def test_group_and_replica_flags_are_checked_against_the_groups():
    """`jaxpd serve decode --group G --replica I` (how a Kubernetes pod names itself): the
    role-wide replica number, or an error naming what to fix."""
    from jaxpd.config import parse_config
    from jaxpd.serving.serve_cli import _replica_in_group

    cfg = parse_config({"mode": "disaggregated", "prefill": {"devices": [0]},
                        "decode": [{"devices": [1, 2], "replicas": 2}, {"devices": [3]}]})
    assert [_replica_in_group(cfg, "decode", g, i) for g, i in ((0, 0), (0, 1), (1, 0))] == \
        [0, 1, 2]
    for role, group, replica, message in [
            ("router", 0, 0, "--group: only for a worker role"),
            ("decode", 2, 0, "--group 2: decode has 2 group(s)"),
            ("decode", 1, 1, "--replica 1: decode[1].replicas is 1"),
            ("colocated", 0, 0, "role 'colocated' needs mode: colocated")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            _replica_in_group(cfg, role, group, replica)
