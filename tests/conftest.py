"""Shared fixtures: an agent target (a real gRPC server over a real workspace root) and its client."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from agent.config import AgentConfig
from agent.server import create_server
from workspace.agent.v1 import agent_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


@dataclass
class AgentTarget:
    """An agent under test: where it listens, its token, and the workspace root as seen from the test."""

    kind: str
    address: str
    token: str
    root: Path
    channel: aio.Channel
    stub: agent_pb2_grpc.AgentServiceStub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


async def start_inprocess_agent(root: Path, **overrides) -> tuple[aio.Server, AgentTarget]:
    """A real agent server on 127.0.0.1, port 0, with a random token."""
    token = secrets.token_urlsafe(16)
    config = AgentConfig(root=root, listen="127.0.0.1:0", token=token, **overrides)
    server, port, _ = await create_server(config)
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = aio.insecure_channel(address)
    target = AgentTarget("inprocess", address, token, root, channel, agent_pb2_grpc.AgentServiceStub(channel))
    return server, target


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentTarget]:
    """An in-process agent rooted in a fresh directory."""
    root = tmp_path / "app"
    root.mkdir()
    server, target = await start_inprocess_agent(root)
    try:
        yield target
    finally:
        await target.channel.close()
        await server.stop(None)


def status_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, aio.AioRpcError), error
    return error.code()
