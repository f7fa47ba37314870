"""A grpc.aio server as every jaxpd process runs it: one port, health, reflection, sane limits.

`grpc.so_reuseport` is off: otherwise a second process binds a port that is already taken and
requests are split between the two at random. A port that cannot be bound is a ConfigError that
names the config key to change.
"""

from __future__ import annotations

from typing import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxpd.errors import ConfigError

MAX_MESSAGE_BYTES = 1 << 30


def channel_options() -> list[tuple[str, int]]:
    """Large messages (KV frames), and reconnects capped at 2 s: gRPC's default backoff grows
    to 2 minutes, so a worker restarted after a long model load would otherwise sit unused."""
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000)]


def new_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=channel_options())


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
                       services: Iterable[str], register) -> ServerWithHealth:
    """Bind `host:port` (0 = any free port), register servicers (`register(server)`), health
    and reflection, and start. `key`/`where` name the config entry when the bind fails."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *channel_options()])
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                        server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise ConfigError(f"{where}: {key}: cannot listen on {host}:{port} (the port is already "
                          f"in use, or the host is not an address of this machine)")
    await server.start()
    return ServerWithHealth(server, health_servicer, bound, host)
