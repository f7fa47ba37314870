"""One role's process: a prefill, decode or colocated worker, or the router.

`jaxpd serve ROLE --config FILE --replica I` lands here (the launcher starts every role this
way). The caller has already made the replica's own devices the only visible ones, so a worker's
mesh is always its local devices 0..tp-1. A process prints one `JAXPD_READY {json}` line once it
serves, and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from jaxpd.config import DeploymentConfig, MeshSection
from jaxpd.errors import ConfigError, JaxpdError
from jaxpd.serving import multihost
from jaxpd.transfer.jax_plane import transfer_host

log = logging.getLogger("jaxpd.serve")

ROLES = ("router", "prefill", "decode", "colocated")
READY_PREFIX = "JAXPD_READY "
PROGRESS_PREFIX = "JAXPD_PROGRESS "  # compile progress, shown by the launcher


@dataclasses.dataclass(frozen=True)
class WorkerPlace:
    """Where replica `replica` of a role sits: its group, the group's YAML key, its index
    within the group, and the deployment as that group sees it (`DeploymentConfig.for_group`:
    the group's own KV pages and decode batch), which its engine is built from."""

    group: MeshSection
    key: str
    local: int
    view: DeploymentConfig

    @property
    def port(self) -> int:
        """Its configured port (group port + index within the group), 0 = any free port."""
        return self.group.port + self.local if self.group.port else 0


def check_role(deployment: DeploymentConfig, role: str) -> None:
    if role == "decode" and deployment.mode != "disaggregated":
        raise ConfigError("role 'decode' needs mode: disaggregated (colocated deployments run "
                          "'colocated' workers)")
    if role == "prefill" and deployment.mode != "disaggregated":
        raise ConfigError("role 'prefill' needs mode: disaggregated (colocated deployments run "
                          "'colocated' workers)")
    if role == "colocated" and deployment.mode != "colocated":
        raise ConfigError("role 'colocated' needs mode: colocated")


def worker_group(deployment: DeploymentConfig, role: str, replica: int = 0) -> WorkerPlace:
    """The group replica `replica` of `role` belongs to (replicas are numbered across a role's
    groups); ConfigError when the mode has no such role or the role no such replica."""
    check_role(deployment, role)
    try:
        group, index, local = deployment.locate(role, replica)
    except IndexError:
        total = deployment.replicas(role)
        section = "decode" if role == "decode" else "prefill"
        raise ConfigError(f"--replica {replica}: {section} has {total} replica(s) "
                          f"(0 to {total - 1}, numbered across its groups)") from None
    return WorkerPlace(group, deployment.group_key(role, index), local,
                       deployment.for_group(role, index))


def announce(role: str, replica: int, address: str, **extra) -> None:
    print(READY_PREFIX + json.dumps({"role": role, "replica": replica, "address": address,
                                     **extra}), flush=True)


async def _until_signalled(stop: asyncio.Event | None = None) -> None:
    """Until SIGTERM/SIGINT (or `stop` is set by the process itself)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


EXIT_BROKEN = 3  # a worker whose engine step failed exits with this, to be restarted


# -- workers ---------------------------------------------------------------------------------------
def _load_worker(deployment: DeploymentConfig, tp: int):
    """(engine, model config, wire context) on this process's devices, compiled and warm."""
    import jax

    from jaxpd.engine.builder import build_engine
    from jaxpd.model.checkpoint import load_model
    from jaxpd.model.sharding import make_mesh
    from jaxpd.serving.worker_common import local_deployment
    from jaxpd.tokenizer import merge_tokenizer_eos, tokenizer_for_checkpoint
    from jaxpd.transfer.wire import WireContext, model_fingerprint

    devices = jax.devices()
    if len(devices) < tp:
        raise JaxpdError(f"this worker needs tp={tp} devices but sees {len(devices)} "
                         f"({devices[0].platform})")
    mesh = make_mesh(devices[:tp], tp)
    model = load_model(deployment.model.checkpoint, mesh, deployment.model.dtype,
                       deployment.model.scan_layers, deployment.model.weight_dtype)
    tokenizer = tokenizer_for_checkpoint(model.folder)
    config = merge_tokenizer_eos(model.config, tokenizer)
    engine = build_engine(config, model.params, local_deployment(deployment, tp))
    wire = WireContext(model_fingerprint(config, model.params), engine.prefill.manager.layout,
                       deployment.serving.kv_message_bytes)
    return engine, config, wire, tokenizer


def _role_shapes(role: str, engine) -> tuple[object, list, list]:
    """(runner, the programs this role runs likeliest first, those it needs before serving)."""
    if role == "colocated":
        (runner, shapes), = engine.shapes()
        (_, first), = engine.first_shapes()
        return runner, shapes, first
    stage = engine.prefill if role == "prefill" else engine.decode
    shapes = stage.shapes()
    return stage.runner, shapes, shapes[:1]


def precompile_mode() -> str:
    """JAXPD_PRECOMPILE: `background` (default), `all`, `first` or `off` (`jaxpd serve
    --help`)."""
    from jaxpd.serving.serve_cli import PRECOMPILE_ENV

    value = os.environ.get(PRECOMPILE_ENV, "background").strip().lower()
    if value in ("off", "0", "false", "no"):
        return "off"
    if value not in ("background", "all", "first"):
        raise ConfigError(f"{PRECOMPILE_ENV}={value!r}: expected background, all, first or off")
    return value


class _Progress:
    """Prints `JAXPD_PROGRESS {json}` lines (compile progress) for the launcher to display."""

    def __init__(self, role: str, replica: int):
        self.role, self.replica = role, replica
        self.started = time.perf_counter()

    def __call__(self, progress, phase: str) -> None:
        print(PROGRESS_PREFIX + json.dumps({
            "role": self.role, "replica": self.replica, "phase": phase, "done": progress.done,
            "total": progress.total, "seconds": round(time.perf_counter() - self.started, 2),
            "compile_seconds": round(progress.seconds, 2), "cache_hits": progress.cache_hits}),
            flush=True)


def _log_request_path_compiles(count=lambda: None) -> None:
    """Log every XLA compilation that happens on an engine thread (the request path), with
    JAX's own compile hook, and `count()` it: with `--precompile background` or `all` the step
    programs never should; small helper programs (KV gathers and writes) may, once per bucket."""
    import threading

    import jax

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and \
                threading.current_thread().name.startswith("engine-"):
            log.info("compiled %s on the request path in %.2f s", kwargs.get("fun_name", "?"),
                     duration)
            count()

    jax.monitoring.register_event_duration_secs_listener(listener)


def _warm_up(role: str, replica: int, engine) -> tuple[str, object]:
    """Before the port opens: compile the programs first requests need (the smallest prefill
    and decode shapes of this role). Then, by `precompile_mode()`: `background` leaves the rest
    to a compile thread started once serving (until a shape is ready, steps run padded up to a
    ready one or trimmed to fit it: never a compilation on the request path); `all` compiles
    every shape now; `first` never compiles the rest (every step fits the first programs);
    `off` compiles the rest on first use, on the request path. Returns (what was done, for the
    log; a callable that starts the background compiles)."""
    runner, shapes, first = _role_shapes(role, engine)
    mode = precompile_mode()
    progress = _Progress(role, replica)
    if mode == "background":
        runner.programs.plan(shapes)  # progress counts every program, not just the first
    runner.programs.compile_all(shapes if mode == "all" else first,
                                lambda p: progress(p, "startup"))
    done = runner.programs.progress()
    warm = " from the persistent cache" if done.cache_hits == done.done else ""
    runner.compile_on_demand = mode == "off"

    def start_background() -> None:
        if mode == "background":
            runner.programs.compile_in_background(
                shapes, lambda p: progress(p, "background"), name=f"compile-{role}-{replica}")

    what = {"all": f"all {done.done} step programs compiled{warm}",
            "first": f"{done.done} first step programs compiled{warm} (no others: steps fit them)",
            "off": f"{done.done} first step programs compiled{warm} (the rest on first use)",
            "background": f"{done.done} first step programs compiled{warm}; "
                          f"{len(set(shapes) - set(first))} more in the background"}[mode]
    return what, start_background


def _follow_worker(role: str, replica: int, deployment: DeploymentConfig,
                   member: multihost.HostGroup) -> int:
    """Another host of a multi-host replica: load and compile exactly what the leader does,
    then replay its device ops until it stops (0) or dies (EXIT_BROKEN)."""
    from jaxpd.serving.grpc_server import internal_secret

    place = worker_group(deployment, role, replica)
    engine, *_ = _load_worker(place.view, place.group.tp)
    runner = _role_shapes(role, engine)[0]
    _, start_background = _warm_up(role, replica, engine)
    start_background()
    sock = multihost.connect(member, internal_secret(), deployment.serving.startup_timeout_s)
    log.info("%s-%d host %d: following the leader's step stream", role, replica, member.index)
    try:
        return multihost.follow(sock, runner.execute, member.index)
    finally:
        engine.stop_compiling()


async def _serve_worker(role: str, replica: int, deployment: DeploymentConfig, where: str,
                        port: int | None = None, metrics_port: int | None = None,
                        member: multihost.HostGroup | None = None) -> int:
    """Serve one worker until SIGTERM (drain: its requests move to other workers, exit 0) or a
    failed engine step (NOT_SERVING, exit EXIT_BROKEN for the launcher to restart it). With
    `member` (the leader of a multi-host replica) every device op goes to the other hosts too."""
    import grpc

    from jaxpd.serving.decode_worker import DecodeScheduler, DecodeServicer, kv_transfer_handler
    from jaxpd.serving.engine_thread import EngineThread
    from jaxpd.serving.grpc_server import start_server
    from jaxpd.serving.prefill_worker import PrefillScheduler, PrefillServicer
    from jaxpd.serving.worker_common import DRAINING, WorkerState
    from jaxpd.v1 import worker_pb2_grpc

    from jaxpd.serving import metrics as prom

    place = worker_group(deployment, role, replica)
    group, key, deployment = place.group, place.key, place.view
    serving = deployment.serving
    loop = asyncio.get_running_loop()
    steps = None
    if member is not None:  # bound first: a taken port fails before minutes of loading
        from jaxpd.serving.grpc_server import internal_secret

        def lost(why: str) -> None:  # the replica stops as a unit: its requests migrate
            log.error("%s-%d: %s; exiting %d so the whole replica restarts", role, replica, why,
                      EXIT_BROKEN)
            logging.shutdown()
            sys.stdout.flush()
            os._exit(EXIT_BROKEN)

        steps = multihost.StepLeader(member, internal_secret(), serving.liveness_timeout_s, lost)
    compiles: list = []
    _log_request_path_compiles(lambda: compiles and compiles[0].inc())
    engine, config, wire, tokenizer = await loop.run_in_executor(None, _load_worker, deployment,
                                                                 group.tp)
    state = WorkerState(role, replica, deployment, engine, config, wire, tokenizer)
    digests = serving.record_kv_digests
    if role == "prefill":
        scheduler = PrefillScheduler(engine, record_digests=digests,
                                     kv_timeout_s=serving.kv_timeout_s)
    else:
        scheduler = DecodeScheduler(engine, wire, record_digests=digests,
                                    kv_timeout_s=serving.kv_timeout_s, name=state.name)
    started = time.perf_counter()
    done, start_background = await loop.run_in_executor(None, _warm_up, role, replica, engine)
    log.info("%s-%d: %s in %.1f s (compilation cache: %s)", role, replica, done,
             time.perf_counter() - started, os.environ.get("JAXPD_CACHE_DIR", "off"))
    stop, broken = asyncio.Event(), []
    runner = (engine.prefill if role == "prefill" else engine.decode).runner
    if steps is not None:
        await loop.run_in_executor(None, steps.accept, serving.startup_timeout_s)
        runner.lockstep = steps.publish
        log.info("%s-%d: every host of the replica follows (tp=%d over %d hosts)", role, replica,
                 group.tp, group.hosts)
    snapshot = lambda: thread.snapshot  # noqa: E731
    if serving.metrics.enabled:
        state.metrics = prom.WorkerMetrics(snapshot, lambda: len(runner.programs))
        compiles.append(state.metrics.request_path_compiles)

    def on_step(seconds: float, before: dict) -> None:
        if state.metrics is not None:
            state.metrics.step.observe(seconds)
            state.metrics.batch.observe(before.get("running", 0))

    def on_broken(error: Exception) -> None:
        broken.append(error)
        stop.set()

    thread = EngineThread(f"engine-{role}-{replica}", scheduler.has_work, scheduler.step,
                          scheduler.fail_all, loop, tick=scheduler.tick, snapshot=scheduler.load,
                          on_broken=on_broken, on_step=on_step)
    if role == "decode" and serving.reserve_while_decoding:  # answered while a call runs
        engine.while_decoding = thread.run_host_commands
    if state.metrics is not None:
        state.metrics_url = prom.serve(state.metrics.registry, serving.metrics.host,
                                       metrics_port if metrics_port is not None else serving.metrics.port)

    servicer = None

    def register(server) -> None:
        nonlocal servicer
        if role == "prefill":
            servicer = PrefillServicer(state, scheduler, thread)
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
        else:
            servicer = DecodeServicer(state, scheduler, thread)
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
            server.add_generic_rpc_handlers((kv_transfer_handler(servicer),))

    services = (["jaxpd.v1.PrefillWorker"] if role == "prefill"
                else ["jaxpd.v1.DecodeWorker", "jaxpd.v1.KVTransfer"])
    if port is None:
        port = place.port
    server = await start_server(group.host, port, key=f"{key}.port", where=where,
                                services=services, register=register, internal=True,
                                max_message_bytes=serving.kv_message_bytes + (1 << 20))
    state.address = server.address
    state.transfer_host = transfer_host(group.host, serving.data_host)
    if role == "decode" and serving.transport == "jax":  # PushKV frames name what to pull
        from jaxpd.transfer.jax_plane import SCHEME as JAX_SCHEME

        state.data_address = JAX_SCHEME + server.address
    data_plane = None
    if role == "decode" and serving.transport in ("tcp", "shm", "auto"):  # KV outside gRPC
        from jaxpd.serving.decode_worker import KVIntake, TransferError
        from jaxpd.transfer import wire as wire_lib
        from jaxpd.transfer.tcp_plane import TcpKVServer

        data_plane = TcpKVServer(
            group.host, lambda: KVIntake(servicer, copy=True),
            serving.kv_message_bytes + (1 << 16), (wire_lib.WireError, TransferError),
            advertise=serving.data_host, scheme=f"{serving.transport}://")
        state.data_address = await data_plane.start()
        import jax

        on_accelerator = jax.devices()[0].platform != "cpu"
        if serving.transport == "auto" and on_accelerator:  # where to pull, for a peer that is too
            state.data_address += "?jax=" + server.address
        log.info("%s-%d: KV data plane on %s", role, replica, state.data_address)
    thread.start()
    await server.set_serving()
    log.info("%s-%d serving on %s (tp=%d)", role, replica, server.address, group.tp)
    announce(role, replica, server.address)
    start_background()
    try:
        await _until_signalled(stop)
        await server.set_serving(False)
        if broken:
            log.error("%s-%d: stopping after a failed engine step (%r); exit %d so it is "
                      "restarted", role, replica, broken[0], EXIT_BROKEN)
            return EXIT_BROKEN
        # drain: the requests here end UNAVAILABLE, and the router moves each one elsewhere
        state.state = DRAINING
        thread.post(lambda: scheduler.fail_all(f"{state.name} is draining (SIGTERM)",
                                               grpc.StatusCode.UNAVAILABLE))
        deadline = time.monotonic() + 5.0
        while thread.snapshot.get("requests", 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return 0
    finally:
        if data_plane is not None:
            await data_plane.stop()
        if role == "prefill" and servicer is not None:
            servicer.close()  # pooled data-plane connections (and their shared memory)
        await server.stop(1.0)
        thread.stop()
        engine.stop_compiling()
        if steps is not None:
            steps.close()


# -- the router -------------------------------------------------------------------------------------
def _addresses(deployment: DeploymentConfig, role: str, given: list[str] | None) -> list[str]:
    """The role's worker addresses in replica order: as given (`--prefill-addresses`), else
    from each group's host and port."""
    if given is not None:
        if len(given) != deployment.replicas(role):
            section = "decode" if role == "decode" else "prefill"
            raise ConfigError(f"{len(given)} {role} address(es) given but {section} has "
                              f"{deployment.replicas(role)} replica(s)")
        return given
    out = []
    for index, group in enumerate(deployment.groups(role)):
        if not group.port:
            raise ConfigError(f"{deployment.group_key(role, index)}.port: set the workers' port "
                              f"so the router can find them (port 0 only works when `jaxpd "
                              f"serve --config` starts every process)")
        out += [group.address(i) for i in range(group.replicas)]
    return out


def served_model_name(deployment: DeploymentConfig) -> str:
    """What clients call the model: model.name, else the checkpoint folder's name."""
    if deployment.model.name:
        return deployment.model.name
    checkpoint = deployment.model.checkpoint
    return Path(checkpoint).resolve().name if checkpoint else "jaxpd-default"


async def _start_http(deployment: DeploymentConfig, router, folder: Path, healthy,
                      chat_template: str | None):
    """The OpenAI-compatible API on the router's event loop (jaxpd/serving/openai_api.py):
    (the uvicorn server, its task, its URL)."""
    import uvicorn

    from jaxpd.serving.grpc_server import CREDENTIALS
    from jaxpd.serving.openai_api import OpenAIServer
    from jaxpd.tokenizer.chat_template import ChatTemplate

    http = deployment.serving.http
    template = ChatTemplate.for_checkpoint(folder, chat_template or http.chat_template)
    api = OpenAIServer(router, model_name=served_model_name(deployment), chat_template=template,
                       token=CREDENTIALS.token, max_body_bytes=deployment.serving.max_request_bytes,
                       healthy=healthy)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the router's own handlers stop it (drain first)
            yield

    server = Server(uvicorn.Config(api.app, host=http.host, port=http.port, log_level="warning",
                                   lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():  # it could not bind (the error is in its log)
            task.result()
            raise JaxpdError(f"serving.http: cannot listen on {http.host}:{http.port}")
        await asyncio.sleep(0.02)
    sockets = [s for srv in server.servers for s in srv.sockets]
    port = sockets[0].getsockname()[1] if sockets else http.port
    url = f"http://{http.host}:{port}"
    if template is None:
        log.info("HTTP API: the model has no chat template: /v1/chat/completions answers 400")
    return server, task, url


async def _serve_router(deployment: DeploymentConfig, where: str, prefill: list[str] | None,
                        decode: list[str] | None, port: int | None = None,
                        metrics_port: int | None = None, http_port: int | None = None,
                        chat_template: str | None = None) -> int:
    from jaxpd.model.checkpoint import default_checkpoint, load_config
    from jaxpd.serving.grpc_server import add_lenient, start_server
    from jaxpd.serving.router import Router
    from jaxpd.serving.worker_pool import WorkerPool, make_workers
    from jaxpd.tokenizer import merge_tokenizer_eos, tokenizer_for_checkpoint
    from jaxpd.v1 import generation_pb2_grpc

    serving = deployment.serving
    folder = Path(deployment.model.checkpoint) if deployment.model.checkpoint else default_checkpoint()
    tokenizer = tokenizer_for_checkpoint(folder)
    config = merge_tokenizer_eos(load_config(folder), tokenizer)
    if deployment.mode == "disaggregated":
        prefill_addrs = _addresses(deployment, "prefill", prefill)
        decode_addrs = _addresses(deployment, "decode", decode)
        decode_role = "decode"
    else:
        prefill_addrs, decode_addrs = [], _addresses(deployment, "colocated", decode)
        decode_role = "colocated"
    pool = WorkerPool(make_workers("prefill", prefill_addrs,
                                   deployment.weights("prefill") if prefill_addrs else []),
                      make_workers(decode_role, decode_addrs, deployment.weights(decode_role)),
                      liveness_timeout_s=serving.liveness_timeout_s)
    try:
        await pool.connect(serving.startup_timeout_s)
    except ConnectionError as e:
        raise JaxpdError(f"router: {e}") from None
    router = Router(deployment, config, tokenizer, served_model_name(deployment), pool=pool)
    if serving.metrics.enabled:
        from jaxpd.serving.metrics import serve

        router.metrics_url = serve(router.metrics.registry, serving.metrics.host,
                                   metrics_port if metrics_port is not None else serving.metrics.port)
    r = serving.router
    server = await start_server(
        r.host, r.port if port is None else port, key="serving.router.port", where=where, services=["jaxpd.v1.Generation"],
        register=lambda s: add_lenient(generation_pb2_grpc.add_GenerationServicer_to_server,
                                       router, s),
        max_message_bytes=serving.max_request_bytes)
    router.address = server.address
    loop = asyncio.get_running_loop()

    def health_changed() -> None:
        healthy = pool.healthy() and not router.draining
        log.warning("router is %s", "serving" if healthy else "NOT_SERVING (a role has no "
                    "serving worker)")
        loop.create_task(server.set_serving(healthy))

    pool.on_change = health_changed
    pool.start()
    await server.set_serving(pool.healthy())
    http = None
    if serving.http is not None:
        if http_port is not None:
            deployment = deployment.model_copy(update={"serving": serving.model_copy(update={
                "http": serving.http.model_copy(update={"port": http_port})})})
        http = await _start_http(deployment, router, folder,
                                 lambda: pool.healthy() and not router.draining, chat_template)
        log.info("OpenAI-compatible HTTP API on %s", http[2])
    log.info("router serving on %s (%d prefill, %d decode workers)", server.address,
             len(prefill_addrs), len(decode_addrs))
    announce("router", 0, server.address, **({"http": http[2]} if http else {}))
    try:
        await _until_signalled()
        await server.set_serving(False)
        left = await router.drain(serving.drain_timeout_s)
        if left:
            log.warning("drain: %d requests still running after %g s (serving.drain_timeout_s)",
                        left, serving.drain_timeout_s)
        return 0
    finally:
        if http is not None:
            http[0].should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(http[1], 5.0)
        await server.stop(1.0)
        await router.close()


def run_role(role: str, deployment: DeploymentConfig, where: str, *, replica: int = 0,
             prefill_addresses: list[str] | None = None,
             decode_addresses: list[str] | None = None, port: int | None = None,
             metrics_port: int | None = None,
             member: multihost.HostGroup | None = None, http_port: int | None = None,
             chat_template: str | None = None) -> int:
    """Run one role until SIGTERM/SIGINT; returns its exit status. Raises JaxpdError for what
    the user must fix. `port` overrides the group's (the launcher fixes each worker's port, so
    a restarted worker comes back where the router looks for it). `member`: this process is
    one host of a multi-host replica (`multihost.resolve`)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {role}-{replica} %(levelname)s %(message)s")
    # jax logs every accelerator platform it probes and does not find (e.g. libtpu) at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from jaxpd.serving.grpc_server import configure

    configure(deployment.serving)  # TLS files and the token, read once
    if role == "router":
        return asyncio.run(_serve_router(deployment, where, prefill_addresses, decode_addresses,
                                         port, metrics_port, http_port, chat_template))
    worker_group(deployment, role, replica)  # a replica the deployment has, or ConfigError
    if member is None:
        return asyncio.run(_serve_worker(role, replica, deployment, where, port, metrics_port))
    # Every process of a multi-host replica ends through os._exit, skipping jax.distributed's
    # shutdown barrier: it waits (minutes) for hosts that may be gone or never came, so a
    # failure on one host would otherwise hang the others' exits.
    code = 1
    try:
        multihost.initialize(member, deployment.serving.startup_timeout_s)
        if member.leader:
            code = asyncio.run(_serve_worker(role, replica, deployment, where, port,
                                             metrics_port, member))
        else:
            def with_the_leader(signum, frame) -> None:  # a stop reaches every host at once
                log.info("%s: this host stops when the leader does (its stop, or its end)",
                         signal.Signals(signum).name)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, with_the_leader)
            code = _follow_worker(role, replica, deployment, member)
    except JaxpdError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BaseException:  # noqa: BLE001 - reported, then the process ends below
        log.exception("%s-%d host %d failed", role, replica, member.index)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
