"""`jaxpd serve`: start the deployment a config describes, or one of its roles.

    jaxpd serve --config configs/local.yaml            # router + every worker, one command
    jaxpd serve prefill --config deploy.yaml --replica 1   # one role, e.g. on another host

Without a role it starts every worker process, waits until each reports SERVING, starts the
router with the workers' addresses, prints `jaxpd serving on HOST:PORT`, and stops everything
on Ctrl-C or SIGTERM. If a process dies, it names it, shows its exit status and last log lines,
and stops the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jaxpd.config import DeploymentConfig, load_config
from jaxpd.errors import ConfigError
from jaxpd.serving.process import ROLES, check_role, run_role, worker_group

EPILOG = """\
examples:
  jaxpd serve --config configs/local.yaml
  jaxpd serve --config deploy.yaml -v                    # also show every process's log lines
  jaxpd serve prefill --config deploy.yaml --replica 0   # one role (multi-host deployments)
  jaxpd serve router --config deploy.yaml                # finds workers at prefill.port/decode.port
  jaxpd serve decode --config deploy.yaml --replica 0 --host-index 1 --coordinator HOST0:8476
                                          # host 1 of a multi-host replica (decode.hosts > 1)

Each worker sees only its own devices (replica i of a group uses devices[i*tp:(i+1)*tp]): on
GPU through CUDA_VISIBLE_DEVICES, on TPU through TPU_VISIBLE_CHIPS, on CPU as that many host
devices. A multi-host replica (hosts > 1) is one process per host: `jaxpd serve --config`
starts them all on this machine; by hand, host 0 serves and the others follow it. Then, from
another shell:
  jaxpd client --address 127.0.0.1:50051 --prompt "It is a truth" --max-tokens 32"""


def _address_list(text: str) -> list[str]:
    return [a for a in text.split(",") if a]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="run the gRPC service (router, prefill and decode workers)",
        description="Serve a deployment config over gRPC: the jaxpd.v1.Generation service on "
                    "serving.router, with health and reflection.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", nargs="?", choices=ROLES,
                   help="run only this role; default: start every process the config describes")
    p.add_argument("--config", required=True, metavar="YAML", help="deployment config")
    p.add_argument("--replica", type=int, default=0, metavar="I",
                   help="which replica of the role (default 0), numbered across the role's "
                        "groups in order; with --group, within that group")
    p.add_argument("--group", type=int, metavar="G",
                   help="a role with several groups: --replica counts within group G (0 = the "
                        "first listed), as a Kubernetes pod's index does")
    p.add_argument("--port", type=int, metavar="P",
                   help="one role: listen on this port instead of the config's (`jaxpd serve` "
                        "fixes each worker's port, so a restarted worker comes back there)")
    p.add_argument("--host-index", type=int, metavar="H",
                   help="one role of a multi-host group (hosts > 1): which host of the replica "
                        "this process is, 0 = the one that serves (default: $LWS_WORKER_INDEX)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="one role of a multi-host group: host 0's jax.distributed coordinator "
                        "(default: $LWS_LEADER_ADDRESS and the group's coordinator_port)")
    p.add_argument("--all-visible-devices", action="store_true",
                   help="one role: this process owns every accelerator it sees (a Kubernetes "
                        "pod given its GPUs or TPU chips by the device plugin): use the first "
                        "devices-per-host of them instead of the config's device indices")
    p.add_argument("--metrics-port", type=int, metavar="P",
                   help="one role: serve Prometheus metrics on this port instead of the config's")
    p.add_argument("--prefill-addresses", type=_address_list, metavar="A,B",
                   help="router only: the prefill workers (default: prefill.host and prefill.port)")
    p.add_argument("--decode-addresses", type=_address_list, metavar="A,B",
                   help="router only: the decode (or colocated) workers (default: from the config)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a jinja2 chat template for the HTTP API's /v1/chat/completions, "
                        "replacing the checkpoint's (or serving.http.chat_template)")
    p.add_argument("--http-port", type=int, metavar="P",
                   help="router only: serve the HTTP API on this port instead of "
                        "serving.http.port")
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="JAX's persistent compilation cache for every process (default: "
                        "$JAXPD_CACHE_DIR, else ~/.cache/jaxpd/xla): a restart skips compiling")
    p.add_argument("--precompile", choices=("background", "all", "first", "off"),
                   help="when workers compile their step programs. background (default): the "
                        "smallest prefill and decode shapes before serving, the rest on a "
                        "background thread while serving (a step whose shape is not ready yet "
                        "runs padded up to a ready one, never waiting for a compilation); all: "
                        "every shape before serving; first: only the smallest shapes, ever (the "
                        "fastest start and least memory; larger batches run in several steps); "
                        "off: the rest on first use, on the request path. Also JAXPD_PRECOMPILE")
    p.add_argument("--no-precompile", action="store_const", const="off", dest="precompile",
                   help="same as --precompile off")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="echo every process's log lines, prefixed with its name")


PRECOMPILE_ENV = "JAXPD_PRECOMPILE"  # background | all | first | off: see --precompile


def run(args) -> int:
    from jaxpd import compile_cache

    deployment = load_config(args.config)
    if args.group is not None:
        args.replica = _replica_in_group(deployment, args.role, args.group, args.replica)
    if args.compile_cache is not None:  # the roles read it from the environment
        os.environ[compile_cache.ENV] = args.compile_cache
    if args.precompile is not None:
        os.environ[PRECOMPILE_ENV] = args.precompile
    if args.role is None:
        return launch(deployment, args.config, verbose=args.verbose,
                      chat_template=args.chat_template)
    from jaxpd.serving.devices import router_env, visible_devices_env

    from jaxpd.serving.multihost import resolve

    # Before anything imports jax: this process sees exactly its replica's devices.
    member = None
    if args.role == "router":
        os.environ.update(router_env(os.environ))
    else:
        place = worker_group(deployment, args.role, args.replica)
        group = place.group
        member = resolve(group.hosts, place.key, args.host_index, args.coordinator,
                         group.coordinator_port)
        devices = (list(range(group.devices_per_host)) if args.all_visible_devices
                   else group.replica_devices(place.local))
        os.environ.update(visible_devices_env(devices, os.environ, whole_host=(
            member is not None or args.all_visible_devices)))
    compile_cache.enable()
    return run_role(args.role, deployment, args.config, replica=args.replica,
                    prefill_addresses=args.prefill_addresses,
                    decode_addresses=args.decode_addresses, port=args.port,
                    metrics_port=args.metrics_port, member=member, http_port=args.http_port,
                    chat_template=args.chat_template)


def _replica_in_group(deployment: DeploymentConfig, role: str | None, group: int,
                      local: int) -> int:
    """The role-wide replica number of replica `local` of the role's group `group`."""
    if role in (None, "router"):
        raise ConfigError("--group: only for a worker role (prefill, decode, colocated)")
    check_role(deployment, role)
    sections = deployment.groups(role)
    if not 0 <= group < len(sections):
        raise ConfigError(f"--group {group}: {role} has {len(sections)} group(s)")
    if not 0 <= local < sections[group].replicas:
        raise ConfigError(f"--replica {local}: {deployment.group_key(role, group)}.replicas is "
                          f"{sections[group].replicas}")
    return sum(g.replicas for g in sections[:group]) + local


def _worker_roles(deployment: DeploymentConfig) -> list[tuple[str, int]]:
    """(role, replica) of every worker, replicas numbered across each role's groups."""
    return [(role, i) for role in deployment.roles for i in range(deployment.replicas(role))]


def _check_ports(deployment: DeploymentConfig, where: str, roles) -> None:
    from jaxpd.serving.launcher import check_port_free

    r = deployment.serving.router
    check_port_free(r.host, r.port, "serving.router.port", where)
    if deployment.serving.http is not None:
        h = deployment.serving.http
        check_port_free(h.host, h.port, "serving.http.port", where)
    taken: dict[tuple[str, int], str] = {}  # one machine starts every worker: no port twice
    for role, replica in roles:
        place = worker_group(deployment, role, replica)
        if place.port:
            key = f"{place.key}.port"
            other = taken.setdefault((place.group.host, place.port), key)
            if other != key:
                raise ConfigError(f"{where}: {key}: {role}-{replica} would listen on port "
                                  f"{place.port}, which {other} gives another worker (replica i "
                                  f"of a group uses port + i)")
            check_port_free(place.group.host, place.port, key, where)


def launch(deployment: DeploymentConfig, where: str, *, verbose: bool = False,
           chat_template: str | None = None) -> int:
    """Start every process, serve until a signal, stop everything. Returns the exit status."""
    from jaxpd.serving.compile_view import CompileView
    from jaxpd.serving.launcher import (LaunchInterrupted, Launcher, handle_stop_signals,
                                        role_spec)

    import secrets

    from jaxpd.serving.grpc_server import SECRET_ENV
    from jaxpd.serving.launcher import RestartPolicy, free_port, free_port_pair

    from jaxpd.serving.grpc_server import configure

    roles = _worker_roles(deployment)
    _check_ports(deployment, where, roles)
    configure(deployment.serving)  # a bad TLS file or token fails before any process starts
    env = dict(os.environ)  # each role narrows its own devices (serve_cli.run)
    env.setdefault(SECRET_ENV, secrets.token_hex(16))  # internal calls carry it
    serving = deployment.serving
    router_port = serving.router.port or free_port(serving.router.host)

    def metrics_port(index: int) -> int:
        m = serving.metrics
        return m.port + index if m.port else free_port(m.host)
    started = time.monotonic()
    timeout = deployment.serving.startup_timeout_s
    launcher = Launcher(echo=sys.stderr if verbose else None)
    view = CompileView(launcher.compile_progress, expect=[f"{r}-{i}" for r, i in roles])
    try:
        with launcher, handle_stop_signals(launcher):
            specs, followers = [], []
            for n, (role, i) in enumerate(roles):  # fixed ports: a restart comes back there
                place = worker_group(deployment, role, i)
                group = place.group
                port = place.port or free_port(group.host)
                extra = ["--port", str(port), "--metrics-port", str(metrics_port(1 + n))]
                if group.hosts == 1:
                    specs.append(role_spec(role, i, where, env, extra=extra))
                    continue
                # a multi-host replica: host 0 serves, the others follow; one restart unit
                coordinator = f"127.0.0.1:{free_port_pair('127.0.0.1')}"
                specs.append(role_spec(role, i, where, env, group=f"{role}-{i}", extra=[
                    *extra, "--host-index", "0", "--coordinator", coordinator]))
                followers += [role_spec(role, i, where, env, group=f"{role}-{i}", host=h, extra=[
                    "--host-index", str(h), "--coordinator", coordinator])
                    for h in range(1, group.hosts)]
            for spec in specs + followers:
                launcher.start(spec)
            print(f"jaxpd: starting {', '.join(s.name for s in specs)} ...", file=sys.stderr, flush=True)
            ready = launcher.wait_ready([s.name for s in specs], timeout, on_tick=view.tick)
            view.tick()
            by_role: dict[str, list[str]] = {}
            for (role, _), spec in zip(roles, specs):
                by_role.setdefault(role, []).append(ready[spec.name]["address"])
            workers = by_role.get("decode", by_role.get("colocated", []))
            extra = ["--decode-addresses", ",".join(workers), "--port", str(router_port),
                     "--metrics-port", str(metrics_port(0))]
            if serving.http is not None:  # fixed too: a restarted router comes back there
                extra += ["--http-port", str(serving.http.port or free_port(serving.http.host))]
            if chat_template is not None:
                extra += ["--chat-template", chat_template]
            if "prefill" in by_role:
                extra += ["--prefill-addresses", ",".join(by_role["prefill"])]
            launcher.start(role_spec("router", 0, where, env, extra=extra))
            remaining = max(1.0, timeout - (time.monotonic() - started))
            ready_router = launcher.wait_ready(["router-0"], remaining)["router-0"]
            address = ready_router["address"]
            summary = ", ".join(f"{role} x{len(a)}" for role, a in by_role.items())
            http = f"; OpenAI API on {ready_router['http']}/v1" if ready_router.get("http") else ""
            print(f"jaxpd serving on {address} ({deployment.mode}: {summary}; ready in "
                  f"{time.monotonic() - started:.1f} s){http}. Ctrl-C stops every process.",
                  flush=True)
            restart = RestartPolicy(serving.restart.attempts, serving.restart.backoff_s)
            launcher.serve_forever(
                on_tick=view.tick, restart=restart if restart.attempts else None,
                report=lambda line: print(line, file=sys.stderr, flush=True),
                stop_first=["router-0"], first_grace_s=serving.drain_timeout_s)
            view.close()
            print("jaxpd: stopping every process", file=sys.stderr, flush=True)
    except LaunchInterrupted:
        view.close()
        print("jaxpd: interrupted while starting; stopped every process", file=sys.stderr)
        return 130
    finally:
        view.close()
    return 0

