"""Start a real `jaxpd serve` deployment (separate processes on loopback) for the serving tests."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import grpc
import yaml

from jaxpd.serving.background import ServeProcess
from jaxpd.serving.grpc_server import SECRET_ENV
from jaxpd.v1 import generation_pb2, generation_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "configs" / "local.yaml"


def child_env() -> dict[str, str]:
    """The test session's environment minus its 8-device XLA flag (each role sets its own)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", "")).strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    env[SECRET_ENV] = SECRET  # so tests can make internal calls the way the router does
    return env


SECRET = "test-deployment-secret"
INTERNAL = (("x-jaxpd-internal", SECRET),)


def write_config(path: Path, **overrides) -> Path:
    """configs/local.yaml with the router on a free port and `overrides` (section -> dict)."""
    cfg = yaml.safe_load(LOCAL.read_text())
    cfg["serving"]["router"]["port"] = 0
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


class Deployment(ServeProcess):
    """A running `jaxpd serve` plus the stubs the tests use."""

    address: str = ""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(self.channel())


def start(config: Path, timeout: float = 240, *, precompile: str | None = None,
          verbose: bool = False, extra_args: tuple[str, ...] = ()) -> Deployment:
    """`jaxpd serve --config config`; `precompile` overrides the tests' JAXPD_PRECOMPILE=first,
    `verbose` (-v) keeps every process's log lines in `lines`."""
    env = child_env()
    if precompile is not None:
        env["JAXPD_PRECOMPILE"] = precompile
    d = Deployment(config, env=env, cwd=REPO,
                   extra_args=(("-v",) if verbose else ()) + tuple(extra_args))
    d.address = d.wait_serving(timeout)
    return d


def step_compiles_on_request_path(lines: list[str]) -> list[str]:
    """Worker log lines (`-v`) where JAX's compile hook saw a step program compile on an engine
    thread, that is on the request path."""
    return [line for line in lines if "on the request path" in line
            and ("jit(step)" in line or "jit(decode_steps)" in line)]


def pages_in_use(stub) -> dict[str, int]:
    loads = stub.GetLoads(generation_pb2.GetLoadsRequest(), timeout=5)
    return {f"{w.role}-{w.replica}": w.kv_pages_used for w in loads.workers}


def wait_pages_free(stub, within: float) -> tuple[bool, dict[str, int]]:
    deadline = time.monotonic() + within
    while True:
        used = pages_in_use(stub)
        if not any(used.values()):
            return True, used
        if time.monotonic() > deadline:
            return False, used
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def workers(stub) -> dict:
    """{"decode-0": WorkerInfo, ...} from GetServerInfo."""
    return {f"{w.role}-{w.replica}": w
            for w in stub.GetServerInfo(generation_pb2.GetServerInfoRequest(), timeout=5).workers}


def wait_all_serving(stub, within: float) -> dict:
    """Every worker's WorkerInfo once all report serving (restarted ones with new pids)."""
    deadline = time.monotonic() + within
    while True:
        info = workers(stub)
        if all(w.state == "serving" for w in info.values()):
            return info
        if time.monotonic() > deadline:
            raise AssertionError({k: w.state for k, w in info.items()})
        time.sleep(0.1)


def child_pids(parent: int) -> dict[int, str]:
    """{pid: command line} of the processes whose parent is `parent` (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
