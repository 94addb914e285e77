"""Builds the agent's gRPC server: AgentService, health, reflection, and the interceptors."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from grpc import aio

from agent.activity import ActivityInterceptor, ActivityTracker
from agent.auth import BearerTokenInterceptor
from agent.claim import PoolClaim, SessionSpanInterceptor
from agent.config import AgentConfig
from agent.errors import STATUS_CODES
from agent.service import AgentServicer
from common import telemetry
from common.interceptors import ErrorMappingInterceptor
from common.serving import add_health_and_reflection, bind, new_server
from common.startup import StartupError, check_bindable, unbindable
from workspace.agent.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


async def create_server(config: AgentConfig) -> tuple[aio.Server, int, AgentServicer]:
    """A started-ready (not yet started) server bound to `config.listen`, the bound port (0 for unix
    sockets) and its servicer. Raises StartupError when the address cannot be bound."""
    activity = ActivityTracker()
    # Tracing first (empty while off): its span then covers auth refusals and mapped errors too.
    interceptors: list[aio.ServerInterceptor] = telemetry.server_interceptors()
    auth = BearerTokenInterceptor(config.token) if config.token else None
    claim = PoolClaim(auth)
    if interceptors:  # tracing is on
        interceptors.append(SessionSpanInterceptor(claim))
    if auth is not None:
        interceptors.append(auth)
    interceptors += [ActivityInterceptor(activity), ErrorMappingInterceptor(STATUS_CODES)]
    server = new_server(interceptors)
    servicer = AgentServicer(config, activity, claim)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)

    await add_health_and_reflection(server, SERVICE_NAME)
    check_bindable(config.listen)
    try:
        port = bind(server, config.listen)
    except RuntimeError as error:
        raise unbindable(config.listen) from error
    return server, port, servicer


def write_port_file(path: Path, port: int) -> None:
    """`port` as the whole of `path`, renamed into place: a reader sees no file or the complete number. Not
    fsynced: it only means something while this process runs."""
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temp.write_text(f"{port}\n")
        os.replace(temp, path)
    except OSError as error:
        raise StartupError(f"cannot write --port-file {path} ({error.strerror}): pick a writable path") from error


async def serve(config: AgentConfig, grace: float = 5.0) -> None:
    """Runs the agent until SIGTERM or SIGINT, then stops gracefully within `grace` seconds."""
    server, port, servicer = await create_server(config)
    await server.start()
    if config.port_file is not None:
        try:
            write_port_file(config.port_file, port)
        except StartupError:
            await server.stop(None)
            raise
    log.info("agent serving", extra={"listen": config.listen, "port": port, "root": str(config.root)})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("agent stopping")
    await servicer.close()
    await server.stop(grace)
