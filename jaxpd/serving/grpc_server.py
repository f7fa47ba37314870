"""A grpc.aio server as every jaxpd process runs it: one port, health, reflection, size limits,
and the deployment's internal secret on the internal services.

`grpc.so_reuseport` is off: otherwise a second process binds a port that is already taken and
requests are split between the two at random. A port that cannot be bound is a ConfigError that
names the config key to change.

Internal calls (Prefill, Decode, PushKV, loads) carry the deployment's secret in their metadata
(`x-jaxpd-internal`); a worker refuses any internal call without it (UNAUTHENTICATED), so a
client that learns a worker's address still cannot reserve pages or push KV. `jaxpd serve`
makes one secret per deployment (JAXPD_INTERNAL_SECRET, unless set); roles started by hand
share it through that variable. Without one, internal calls are not checked (logged once).
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
from typing import Callable, Iterable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxpd.errors import ConfigError

log = logging.getLogger(__name__)

INTERNAL_MESSAGE_BYTES = 1 << 30  # what a channel may receive (KV frames are bounded per server)
SECRET_ENV = "JAXPD_INTERNAL_SECRET"
SECRET_KEY = "x-jaxpd-internal"


def channel_options(max_message_bytes: int = INTERNAL_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Message limits, and reconnects capped at 2 s: gRPC's default backoff grows to 2 minutes,
    so a restarted worker would otherwise sit unused."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000)]


# -- TLS: set once per process from the deployment (`configure`) -------------------------------
class _Credentials:
    internal_server: grpc.ServerCredentials | None = None  # workers: mutual TLS
    internal_channel: grpc.ChannelCredentials | None = None  # router, workers, launcher
    public_server: grpc.ServerCredentials | None = None  # the router's public port
    public_channel: grpc.ChannelCredentials | None = None  # the launcher's check of the router
    token: str | None = None  # the public API's bearer token


CREDENTIALS = _Credentials()
TOKEN_ENV = "JAXPD_API_TOKEN"


def configure(serving) -> None:
    """Read `serving.tls`, `serving.internal_tls` and the token once, at process start;
    ConfigError names the key of a file that cannot be read."""
    c = CREDENTIALS
    if serving.internal_tls is not None:
        cert, key, ca = serving.internal_tls.read("serving.internal_tls")
        c.internal_server = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                        require_client_auth=True)
        c.internal_channel = grpc.ssl_channel_credentials(ca, key, cert)
    if serving.tls is not None:
        cert, key, ca = serving.tls.read("serving.tls")
        c.public_server = grpc.ssl_server_credentials([(key, cert)])
        c.public_channel = grpc.ssl_channel_credentials(ca)
    c.token = os.environ.get(TOKEN_ENV) or None
    if serving.auth_token_file is not None:
        try:
            c.token = open(serving.auth_token_file).read().strip()
        except OSError as e:
            raise ConfigError(f"serving.auth_token_file: cannot read {serving.auth_token_file} "
                              f"({e.strerror})") from None
        if not c.token:
            raise ConfigError(f"serving.auth_token_file: {serving.auth_token_file} is empty")


def new_channel(address: str) -> grpc.aio.Channel:
    """An internal channel (router to worker, worker to worker): mutual TLS when configured."""
    if CREDENTIALS.internal_channel is not None:
        return grpc.aio.secure_channel(address, CREDENTIALS.internal_channel, channel_options())
    return grpc.aio.insecure_channel(address, options=channel_options())


def check_channel(address: str, public: bool) -> grpc.Channel:
    """A blocking channel for the launcher's health checks (the router's port is public)."""
    creds = CREDENTIALS.public_channel if public else CREDENTIALS.internal_channel
    return grpc.secure_channel(address, creds) if creds is not None else grpc.insecure_channel(address)


def internal_secret() -> str:
    return os.environ.get(SECRET_ENV, "")


def internal_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata every internal call carries."""
    secret = internal_secret()
    return ((SECRET_KEY, secret),) if secret else ()


class _MetadataAuth(grpc.aio.ServerInterceptor):
    """Refuses calls to `services` whose metadata `key` is not `expected` (UNAUTHENTICATED);
    health and reflection stay open (probes, tools)."""

    def __init__(self, services: Iterable[str], key: str, expected: str, message: str):
        self.prefixes = tuple(f"/{s}/" for s in services)
        self.key, self.expected, self.message = key, expected.encode(), message

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if not details.method.startswith(self.prefixes):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get(self.key, "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self.expected):
            return await continuation(details)
        handler = await continuation(details)
        return _refusing(handler, self.message)


def _refusing(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    if handler is None or handler.unary_unary or handler.stream_unary:
        kind = grpc.stream_unary_rpc_method_handler if handler and handler.stream_unary \
            else grpc.unary_unary_rpc_method_handler
    else:
        kind = grpc.stream_stream_rpc_method_handler if handler.stream_stream \
            else grpc.unary_stream_rpc_method_handler
    fn = unary if kind in (grpc.unary_unary_rpc_method_handler,
                           grpc.stream_unary_rpc_method_handler) else streaming
    return kind(fn, request_deserializer=None, response_serializer=None)


# -- requests that do not parse ------------------------------------------------------------------
class Undecodable:
    """What a lenient deserializer hands a handler instead of raising: the handler answers
    INVALID_ARGUMENT (grpc-python would answer UNKNOWN and log a traceback)."""

    def __init__(self, type_name: str, error: str):
        self.message = (f"the request is not a valid {type_name}: a text field (prompt, "
                        f"request_id, sampling.stop) holds bytes that are not UTF-8, or the "
                        f"message is malformed ({error})")


def _lenient(parse: Callable[[bytes], object], type_name: str) -> Callable[[bytes], object]:
    def deserialize(raw: bytes):
        try:
            return parse(raw)
        except (DecodeError, UnicodeDecodeError) as e:
            return Undecodable(type_name, str(e) or type(e).__name__)
    return deserialize


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        @functools.wraps(inner)
        async def unary(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await inner(request, context)
        return handler._replace(unary_unary=unary)
    if handler.unary_stream is not None:
        inner = handler.unary_stream

        @functools.wraps(inner)
        async def stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for response in inner(request, context):
                yield response
        return handler._replace(unary_stream=stream)
    return handler


class _LenientRegistrar:
    """Stands in for a server in a generated `add_*Servicer_to_server`, so each method's
    deserializer becomes lenient before the real server sees it."""

    def __init__(self, server: grpc.aio.Server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        """Dropped: the generated code passes the same methods to
        `add_registered_method_handlers` next, which registers them (patched) both ways."""

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        patched = {}
        for name, h in handlers.items():
            parse = h.request_deserializer
            type_name = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
            label = type_name.full_name if type_name is not None else f"{service}.{name} request"
            patched[name] = _guard(h._replace(request_deserializer=_lenient(parse, label)))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, patched),))
        self.server.add_registered_method_handlers(service, patched)


def add_lenient(add_servicer: Callable, servicer, server: grpc.aio.Server) -> None:
    """`add_servicer(servicer, server)` (a generated `add_*Servicer_to_server`) with requests
    that do not parse answered INVALID_ARGUMENT."""
    add_servicer(servicer, _LenientRegistrar(server))


# -- the server ----------------------------------------------------------------------------------
class ServerWithHealth:
    """A started server plus its health servicer (NOT_SERVING until `set_serving`)."""

    def __init__(self, server: grpc.aio.Server, health_servicer, port: int, host: str):
        self.server, self.health, self.port, self.host = server, health_servicer, port, host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def set_serving(self, serving: bool = True) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", status)

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(host: str, port: int, *, key: str, where: str,
                       services: Iterable[str], register,
                       max_message_bytes: int = INTERNAL_MESSAGE_BYTES,
                       internal: bool = False) -> ServerWithHealth:
    """Bind `host:port` (0 = any free port), register servicers (`register(server)`), health
    and reflection, and start. `key`/`where` name the config entry when the bind fails;
    `max_message_bytes` bounds what a client may send; `internal` requires the deployment's
    secret on `services`."""
    services = list(services)
    interceptors = []
    if internal:
        secret = internal_secret()
        if secret:
            interceptors.append(_MetadataAuth(services, SECRET_KEY, secret, (
                "internal call without this deployment's secret: only jaxpd's own router and "
                "workers may call it")))
        elif CREDENTIALS.internal_server is None:
            log.warning("%s is not set: internal calls are not authenticated (`jaxpd serve` sets "
                        "it; set the same value on every role started by hand)", SECRET_ENV)
        credentials = CREDENTIALS.internal_server
    else:
        credentials = CREDENTIALS.public_server
        if CREDENTIALS.token:
            interceptors.append(_MetadataAuth(services, "authorization", f"Bearer {CREDENTIALS.token}",
                                              "missing or wrong bearer token: send metadata "
                                              "'authorization: Bearer TOKEN' (jaxpd client "
                                              "--token)"))
    options = [("grpc.so_reuseport", 0), *channel_options(max_message_bytes)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                        server)
    try:
        bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials is not None
                 else server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:
        bound = 0
    if not bound:
        raise ConfigError(f"{where}: {key}: cannot listen on {host}:{port} (the port is already "
                          f"in use, or the host is not an address of this machine)")
    await server.start()
    return ServerWithHealth(server, health_servicer, bound, host)
