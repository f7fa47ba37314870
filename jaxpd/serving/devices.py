"""Device isolation for role processes: the environment that makes a worker see exactly its own
devices, as its local devices 0..n-1, whatever the platform.

The config's device indices mean what `jax.devices()` would list in the launcher's own
environment. A worker process is then given only its devices, so its mesh is always its local
devices 0..tp-1 (see `jaxpd.serving.process`). The launcher does not know which platform the
workers will pick (no jax import here: it would initialise a backend and claim accelerators), so
it writes the variables of every platform; each runtime reads only its own:

GPU   `CUDA_VISIBLE_DEVICES=i,j`.
TPU   `TPU_VISIBLE_CHIPS=i,j`, `TPU_PROCESS_BOUNDS=1,1,1` (each worker is a single-process
      slice) and `TPU_CHIPS_PER_PROCESS_BOUNDS` from `TPU_CHIP_BOUNDS`: 1 chip `1,1,1`, 2 chips
      `1,2,1`, 4 chips `2,2,1` (a v4/v5p host, or half a v5e/v6e host), 8 chips `2,4,1` (a
      v5e/v6e host). Because several libtpu processes share the host, each also gets its own
      `TPU_PROCESS_PORT` / `TPU_PROCESS_ADDRESSES` (8476 + its first chip, so replicas never
      collide), `CLOUD_TPU_TASK_ID=0` and `ALLOW_MULTIPLE_LIBTPU_LOAD=1`. Other chip counts have
      no rectangular default: set `TPU_CHIPS_PER_PROCESS_BOUNDS` (and `TPU_PROCESS_BOUNDS`)
      yourself in the environment of `jaxpd serve`.
CPU   `--xla_force_host_platform_device_count=n` in `XLA_FLAGS`, replacing any such flag there
      (host devices are per process, so only the count matters).

What the user already set is respected:
- `CUDA_VISIBLE_DEVICES` / `TPU_VISIBLE_CHIPS` already set: config indices index into that list
  (with `CUDA_VISIBLE_DEVICES=4,5,6,7`, devices [0, 1] become `4,5`), exactly as `jax.devices()`
  numbers them; the launcher narrows the user's selection and never widens it. An index past
  the end is a ConfigError. Set to empty (or `-1` for CUDA), the platform is hidden on purpose
  and left hidden.
- `TPU_PROCESS_BOUNDS`, `TPU_CHIPS_PER_PROCESS_BOUNDS`, `TPU_PROCESS_PORT`,
  `TPU_PROCESS_ADDRESSES`, `CLOUD_TPU_TASK_ID`, `ALLOW_MULTIPLE_LIBTPU_LOAD` already set: kept
  as given (this is how chip counts without a default are served).
- `JAX_PLATFORMS` set: only the variables of the platforms it names are written (so a stale
  `CUDA_VISIBLE_DEVICES` does not matter to a `JAX_PLATFORMS=cpu` deployment).
"""

from __future__ import annotations

import re
from typing import Mapping

from jaxpd.errors import ConfigError

# chips per process -> TPU_CHIPS_PER_PROCESS_BOUNDS (x,y,z of a rectangle of chips on one host)
TPU_CHIP_BOUNDS: dict[int, str] = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
TPU_BASE_PORT = 8476  # libtpu's default process port; worker k uses 8476 + its first chip

_HOST_COUNT_FLAG = "--xla_force_host_platform_device_count"
_HOST_COUNT_RE = re.compile(r"(?:^|\s)--xla_force_host_platform_device_count(?:=\S*)?(?=\s|$)")

_CUDA_NAMES = {"cuda", "gpu", "rocm"}
_TPU_NAMES = {"tpu"}
_CPU_NAMES = {"cpu"}


def visible_devices_env(devices: list[int], base_env: Mapping[str, str], *,
                        whole_host: bool = False) -> dict[str, str]:
    """The full environment for a role process that must see exactly `devices` (indices as the
    launcher's own environment numbers them) as its local devices 0..len(devices)-1.
    `whole_host`: the process owns its host's chips (a host of a multi-host replica, or a
    Kubernetes pod). Its TPU settings are then left to libtpu and the slice: a host of a
    multi-host slice uses all its chips, and the single-process bounds written here would cut
    it off from the others."""
    _check_indices(devices)
    env = dict(base_env)
    platforms = _platforms(env)
    if platforms is None or platforms & _CUDA_NAMES:
        _narrow(env, "CUDA_VISIBLE_DEVICES", devices, hidden=("", "-1"))
    if not whole_host and (platforms is None or platforms & _TPU_NAMES):
        if _narrow(env, "TPU_VISIBLE_CHIPS", devices, hidden=("",)):
            _tpu_process_env(env, devices)
    if platforms is None or platforms & _CPU_NAMES:
        env["XLA_FLAGS"] = with_host_device_count(env.get("XLA_FLAGS", ""), len(devices))
    return env


def router_env(base_env: Mapping[str, str]) -> dict[str, str]:
    """The router's environment: CPU only. It never computes on an accelerator, and on TPU a
    process that initialises libtpu takes chips (and the libtpu lock) that workers need."""
    env = dict(base_env)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def with_host_device_count(xla_flags: str, count: int) -> str:
    """`xla_flags` with exactly one `--xla_force_host_platform_device_count=count`."""
    rest = " ".join(_HOST_COUNT_RE.sub(" ", xla_flags).split())
    return f"{rest} {_HOST_COUNT_FLAG}={count}".strip()


def _check_indices(devices: list[int]) -> None:
    if not devices:
        raise ConfigError("a role process needs at least one device")
    if len(set(devices)) != len(devices) or min(devices) < 0:
        raise ConfigError(f"device indices must be distinct and >= 0, got {list(devices)}")


def _platforms(env: Mapping[str, str]) -> set[str] | None:
    """The platforms JAX_PLATFORMS restricts JAX to, or None when it is unset (any platform)."""
    value = env.get("JAX_PLATFORMS", "").strip().lower()
    return {p.strip() for p in value.split(",") if p.strip()} or None


def _narrow(env: dict[str, str], var: str, devices: list[int], hidden: tuple[str, ...]) -> bool:
    """Set `var` to the selected devices, indexing into the user's own list when there is one.
    False when the user hid this platform on purpose (then it stays hidden)."""
    given = env.get(var)
    if given is None:
        env[var] = ",".join(str(d) for d in devices)
        return True
    if given.strip() in hidden:
        return False
    entries = [e.strip() for e in given.split(",") if e.strip()]
    for d in devices:
        if d >= len(entries):
            raise ConfigError(f"device {d} is not visible: {var}={given} makes {len(entries)} "
                              f"device(s) visible (indices 0..{len(entries) - 1}); fix the "
                              f"device list or {var}")
    env[var] = ",".join(entries[d] for d in devices)
    return True


def _tpu_process_env(env: dict[str, str], devices: list[int]) -> None:
    """libtpu settings for one single-process slice of `devices` chips beside other such
    processes on the same host; values the user set win."""
    env.setdefault("TPU_PROCESS_BOUNDS", "1,1,1")
    bounds = TPU_CHIP_BOUNDS.get(len(devices))
    if bounds is not None:
        env.setdefault("TPU_CHIPS_PER_PROCESS_BOUNDS", bounds)
    port = TPU_BASE_PORT + min(devices)
    env.setdefault("TPU_PROCESS_PORT", str(port))
    env.setdefault("TPU_PROCESS_ADDRESSES", f"localhost:{port}")
    env.setdefault("CLOUD_TPU_TASK_ID", "0")
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
