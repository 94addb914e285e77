"""Pool members on a real engine: labelled as pooled, published like any workspace, claimed once by renaming,
with the template's limits applied to the running container (unless it was started with them), and known by their
session afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import docker
import pytest

from orchestrator.agent_client import AgentClient
from orchestrator.errors import FailedPrecondition
from orchestrator.runtime.base import MANAGED_LABEL, ORCHESTRATOR_LABEL, POOL_LABEL
from orchestrator.runtime.docker import DockerRuntime
from orchestrator.templates import ResourceHints

pytestmark = pytest.mark.docker

HINTS = ResourceHints(memory_mb=384, cpus=0.5, pids=200)


@pytest.fixture
def runtime(docker_runtime: DockerRuntime) -> DockerRuntime:
    return docker_runtime


async def test_a_claimed_member_is_the_sessions_with_its_limits(
    runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    member = await runtime.start_pooled("p1", "pool-credential")
    container = docker_client.containers.get(member.handle)
    assert container.name == "workspace-core-pool-p1"
    assert container.labels == {MANAGED_LABEL: "true", ORCHESTRATOR_LABEL: runtime.instance_id, POOL_LABEL: "warm"}
    ports = container.attrs["NetworkSettings"]["Ports"]
    assert [binding["HostIp"] for binding in ports["3001/tcp"] + ports["4321/tcp"]] == ["127.0.0.1", "127.0.0.1"]
    [listed] = await runtime.list()
    assert (listed.session_id, listed.pool_id) == ("", "p1")

    agent = AgentClient(member.agent_endpoint, "pool-credential")
    try:
        await agent.wait_healthy(30)
        claimed = await runtime.claim(member, "ws-pooled", resources=HINTS)
        await agent.claim("session-token", {"GREETING": "hi"}, "ws-pooled")
        lines: list[str] = []
        assert await agent.run('echo "$GREETING $(id -u)"', on_line=lambda text, _: lines.append(text)) == 0
        assert lines == ["hi 1000"]
    finally:
        await agent.close()

    container.reload()
    assert container.name == "workspace-core-ws-pooled"
    host_config = container.attrs["HostConfig"]
    assert host_config["Memory"] == host_config["MemorySwap"] == 384 * 1024 * 1024
    assert host_config["NanoCpus"] == 500_000_000
    assert host_config["PidsLimit"] == 200
    assert (claimed.session_id, claimed.pool_id, claimed.handle) == ("ws-pooled", "", member.handle)
    [listed] = await runtime.list()
    assert (listed.session_id, listed.pool_id) == ("ws-pooled", "")

    # Once only, whoever asks.
    with pytest.raises(FailedPrecondition):
        await runtime.claim(member, "ws-other", resources=HINTS)
    await runtime.stop("ws-pooled")
    assert await runtime.list() == []


async def test_two_claims_of_one_member_cannot_both_succeed(runtime: DockerRuntime) -> None:
    member = await runtime.start_pooled("p2", "pool-credential")
    # Two runtimes at once (one lock per process; across processes the agent's single Claim, with a credential
    # only the process that started the member holds, is the guard).
    other = DockerRuntime(image=runtime.image, instance_id=runtime.instance_id)
    try:
        results = await asyncio.gather(
            runtime.claim(member, "ws-a", resources=HINTS), other.claim(member, "ws-b", resources=HINTS),
            return_exceptions=True,
        )  # fmt: skip
    finally:
        await other.close()
    assert sorted(type(result).__name__ for result in results) == ["FailedPrecondition", "Workspace"]
    assert [w.session_id for w in await runtime.list()] in (["ws-a"], ["ws-b"])


async def test_a_claimed_member_that_dies_is_reported_as_its_sessions(
    runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    member = await runtime.start_pooled("p3", "pool-credential")
    await runtime.claim(member, "ws-dies", resources=HINTS)
    exits = runtime.exits()
    try:
        await asyncio.to_thread(docker_client.containers.get(member.handle).kill)
        async with asyncio.timeout(30):  # bounds a hang only
            exit = await anext(exits)
    finally:
        assert isinstance(exits, AsyncGenerator)
        await exits.aclose()
    assert (exit.session_id, exit.handle) == ("ws-dies", member.handle)


async def test_a_member_started_with_the_sessions_limits_is_claimed_by_its_rename_alone(
    runtime: DockerRuntime, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    member = await runtime.start_pooled("p4", "pool-credential", kind="hot", resources=HINTS)
    assert member.resources == HINTS
    host_config = docker_client.containers.get(member.handle).attrs["HostConfig"]
    assert (host_config["Memory"], host_config["NanoCpus"], host_config["PidsLimit"]) == (384 * 2**20, 500_000_000, 200)
    updates: list[str] = []
    monkeypatch.setattr(runtime, "_update_limits", lambda container_id, resources: updates.append(container_id))
    claimed = await runtime.claim(member, "ws-same-limits", resources=HINTS)
    assert updates == [] and claimed.resources == HINTS
    assert docker_client.containers.get(member.handle).name == "workspace-core-ws-same-limits"
    # Other limits are applied: a claim with the defaults.
    other = await runtime.start_pooled("p5", "pool-credential", kind="hot", resources=HINTS)
    monkeypatch.undo()
    claimed = await runtime.claim(other, "ws-other-limits", resources=ResourceHints())
    host_config = docker_client.containers.get(other.handle).attrs["HostConfig"]
    assert (host_config["Memory"], host_config["NanoCpus"], host_config["PidsLimit"]) == (1024 * 2**20, 10**9, 512)
    assert claimed.resources == ResourceHints()
