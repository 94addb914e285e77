"""Shared fixtures: an agent target (a real gRPC server over a real workspace root) and its client.
The `agent` fixture runs each test twice: against an agent in this process, and against the agent in a
workspace-core container (marked `docker`); `@pytest.mark.inprocess_only(reason)` keeps a test to the first."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import docker
import grpc
import pytest
from docker.models.containers import Container
from grpc import aio

from agent.config import AgentConfig
from agent.server import create_server
from workspace.agent.v1 import agent_pb2_grpc

pytest.register_assert_rewrite("tests.docker_support")
from tests.docker_support import (  # noqa: E402 (after the rewrite registration)
    agent_token,
    hand_over_before_each_call,
    run_agent_container,
    wait_for_agent,
)

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.docker_support", "tests.postgres_support", "tests.swarm_support"]


@dataclass
class AgentTarget:
    """An agent under test: where it listens, its token, and the workspace root as seen from the test."""

    kind: str
    address: str
    token: str
    root: Path
    channel: aio.Channel
    stub: agent_pb2_grpc.AgentServiceAsyncStub
    # The workspace root as the agent itself sees it (what `pwd` prints there): `root` in this process, /app in a container.
    root_in_agent: str

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
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    target = AgentTarget("inprocess", address, token, root, channel, stub, os.path.realpath(root))
    return server, target


async def start_container_agent(
    client: docker.DockerClient, image: str, root: Path, *agent_args: str
) -> tuple[Container, AgentTarget]:
    """The image's agent in a hardened container with `root` as its /app, reached on 127.0.0.1; `agent_args`
    are added to `python -m agent` (e.g. "--max-archive-files", "20")."""
    container = run_agent_container(client, image, root, *agent_args)
    try:
        address = await wait_for_agent(container)
    except BaseException:
        container.remove(force=True)
        raise
    channel = aio.insecure_channel(address, interceptors=hand_over_before_each_call(root))
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    return container, AgentTarget("container", address, agent_token(container), root, channel, stub, "/app")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "agent" in metafunc.fixturenames:
        targets = [pytest.param("inprocess")]
        if metafunc.definition.get_closest_marker("inprocess_only") is None:
            targets.append(pytest.param("container", marks=pytest.mark.docker))
        metafunc.parametrize("agent", targets, indirect=True)


@pytest.fixture
async def agent(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AgentTarget]:
    """An agent rooted in a fresh directory: in this process, or in a workspace-core container."""
    root = tmp_path / "app"
    root.mkdir()
    if getattr(request, "param", "inprocess") == "container":
        container, target = await start_container_agent(
            request.getfixturevalue("docker_client"), request.getfixturevalue("core_image"), root
        )
        try:
            yield target
        finally:
            await target.channel.close()
            container.remove(force=True)
        return
    server, target = await start_inprocess_agent(root)
    try:
        yield target
    finally:
        await target.channel.close()
        await server.stop(None)


def status_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, aio.AioRpcError), error
    return error.code()
