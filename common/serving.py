"""gRPC server plumbing both services use: message limits, health, reflection, binding."""

from __future__ import annotations

from collections.abc import Sequence

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from common.constants import MiB
from common.interceptors import RequestDecodingInterceptor

# Large enough for one 1 MiB chunk plus framing, in both directions.
MAX_MESSAGE_BYTES = 4 * MiB
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def new_server(interceptors: Sequence[aio.ServerInterceptor]) -> aio.Server:
    """A grpc.aio server with our message limits and `interceptors`, then (innermost, so after auth) the one
    that answers INVALID_ARGUMENT for a request that does not decode; no port reuse, so a taken port fails to bind."""
    return aio.server(
        interceptors=[*interceptors, RequestDecodingInterceptor()],
        options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
    )


async def add_health_and_reflection(server: aio.Server, service_name: str) -> health_aio.HealthServicer:
    """Serves `grpc.health.v1.Health` (SERVING overall and for `service_name`) and server reflection."""
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((service_name, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    return health


def bind(server: aio.Server, address: str) -> int:
    """Listens on HOST:PORT or unix:PATH; returns the bound port (0 for unix sockets).

    Raises RuntimeError when the address cannot be bound."""
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise RuntimeError(f"cannot listen on {address}")
    return port
