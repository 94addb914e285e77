"""Builds the agent's gRPC server: AgentService, health, reflection, and the interceptors."""

from __future__ import annotations

import asyncio
import logging
import signal

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from agent import telemetry
from agent.activity import ActivityInterceptor, ActivityTracker
from agent.config import AgentConfig
from agent.interceptors import BearerTokenInterceptor, ErrorMappingInterceptor
from agent.service import AgentServicer
from workspace.agent.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
# Large enough for one 1 MiB chunk plus framing, in both directions.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


async def create_server(config: AgentConfig) -> tuple[aio.Server, int, AgentServicer]:
    """A started-ready (not yet started) server bound to `config.listen`, the bound port (0 for unix
    sockets) and its servicer. Raises RuntimeError when the address cannot be bound."""
    activity = ActivityTracker()
    # Tracing first (empty while off): its span then covers auth refusals and mapped errors too.
    interceptors: list[aio.ServerInterceptor] = telemetry.server_interceptors()
    if config.token:
        interceptors.append(BearerTokenInterceptor(config.token))
    interceptors += [ActivityInterceptor(activity), ErrorMappingInterceptor()]
    server = aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    servicer = AgentServicer(config, activity)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)

    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(config.listen)
    if port == 0 and not config.listen.startswith("unix:"):
        raise RuntimeError(f"cannot listen on {config.listen}")
    return server, port, servicer


async def serve(config: AgentConfig, grace: float = 5.0) -> None:
    """Runs the agent until SIGTERM or SIGINT, then stops gracefully within `grace` seconds."""
    server, port, servicer = await create_server(config)
    await server.start()
    log.info("agent serving", extra={"listen": config.listen, "port": port, "root": str(config.root)})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("agent stopping")
    await servicer.close()
    await server.stop(grace)
