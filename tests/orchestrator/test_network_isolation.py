"""Workspaces on the Docker runtime's network, tried from inside real containers: one cannot reach another's
agent or dev server, nor the host's services (on its gateway address or its loopback), yet reaches the npm
registry; its published ports still answer on the host's loopback."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator

import docker
import pytest

from orchestrator.agent_client import AgentClient
from orchestrator.runtime.docker import DockerRuntime
from orchestrator.templates import ResourceHints

pytestmark = pytest.mark.docker

HINTS = ResourceHints(memory_mb=256, cpus=0.5, pids=100)
TOKEN = secrets.token_urlsafe(16)
# Prints, per host:port argument, "open" or why the TCP connection failed (3 s at most each).
PROBE = r"""
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(target, "open")
    except OSError as error:
        print(target, type(error).__name__)
"""


@pytest.fixture
def runtime(docker_runtime: DockerRuntime) -> DockerRuntime:
    return docker_runtime


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A host service on every address (0.0.0.0), as many hosts have; the kernel completes handshakes."""
    with socket.create_server(("0.0.0.0", 0), backlog=16) as server:
        yield server.getsockname()[1]


@pytest.fixture
def loopback_listener() -> Iterator[int]:
    """A host service on loopback only, as the orchestrator listens."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        yield server.getsockname()[1]


async def started(runtime: DockerRuntime, session_id: str) -> AgentClient:
    workspace = await runtime.start(session_id, TOKEN, resources=HINTS, env={}, labels={})
    client = AgentClient(workspace.agent_endpoint, TOKEN)
    await client.wait_healthy(timeout=60)
    return client


async def probe(client: AgentClient, *targets: str) -> dict[str, str]:
    lines: list[str] = []
    assert await client.run(f"python3 -c '{PROBE}' {' '.join(targets)}", on_line=lambda t, _: lines.append(t)) == 0
    return dict(line.split(" ", 1) for line in lines)


async def test_workspaces_reach_registries_but_not_each_other_nor_the_host(
    runtime: DockerRuntime, docker_client: docker.DockerClient, host_listener: int, loopback_listener: int
) -> None:
    a, b = await started(runtime, "ws-net-a"), await started(runtime, "ws-net-b")
    try:
        await b.start_process("dev", "exec python3 -m http.server 4321")
        network = docker_client.networks.get(runtime.network_name)
        b_address = network.attrs["Containers"][_container_id(docker_client, "ws-net-b")]["IPv4Address"].split("/")[0]
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
        b_targets = [f"{b_address}:3001", f"{b_address}:4321"]

        # B serves on its address (seen from B itself), and the host's services answer on the gateway address.
        assert await _eventually_open(b, *b_targets)
        assert _open_from_host(gateway, host_listener)

        seen_from_a = await probe(
            a, *b_targets, f"{gateway}:{host_listener}", f"{gateway}:{loopback_listener}",
            f"127.0.0.1:{loopback_listener}", "registry.npmjs.org:443",
        )  # fmt: skip
        assert seen_from_a.pop("registry.npmjs.org:443") == "open"
        assert "open" not in seen_from_a.values(), seen_from_a
        # Published ports still answer on the host's loopback (the clients above use them).
        assert (await a.activity()).started_at.seconds > 0
    finally:
        await a.close()
        await b.close()


def _container_id(client: docker.DockerClient, session_id: str) -> str:
    return client.containers.get(f"workspace-core-{session_id}").id


def _open_from_host(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=3):
        return True


async def _eventually_open(client: AgentClient, *targets: str) -> bool:
    """Whether `targets` accept connections from inside the workspace, once its dev server has bound."""
    for _ in range(50):
        if set((await probe(client, *targets)).values()) == {"open"}:
            return True
    return False
