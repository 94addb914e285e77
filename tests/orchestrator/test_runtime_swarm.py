"""The Swarm runtime on a single-node swarm on loopback, through the real gRPC server: a session's life
(create, READY, exec, save, delete), the hardening and limits in its service's spec, reconciliation after an
orchestrator restart, a warm pool member claimed by one session only, and a workspace that stops coming back
from its last save."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
from collections.abc import AsyncIterator

import docker
import grpc
import pytest

from orchestrator.config import OrchestratorConfig
from orchestrator.errors import FailedPrecondition
from orchestrator.runtime.base import MANAGED_LABEL, ORCHESTRATOR_LABEL, POOL_LABEL, SESSION_LABEL
from orchestrator.runtime.swarm import TOKEN_SECRET_PATH, SwarmRuntime
from orchestrator.templates import ResourceHints
from tests.orchestrator.conftest import (
    OrchestratorUnderTest,
    derive_template,
    http_get,
    start_orchestrator,
)
from tests.orchestrator.test_warm_pool import create_ready, from_pool, pool_of, refused, shell_output
from tests.swarm_support import remove_instance
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

pytestmark = pytest.mark.docker

READY, FAILED, STOPPED = pb.SESSION_STATE_READY, pb.SESSION_STATE_FAILED, pb.SESSION_STATE_STOPPED
HINTS = ResourceHints(memory_mb=384, cpus=0.5, pids=200)


@pytest.fixture
def swarm_config(
    orchestrator_config: OrchestratorConfig, core_image: str, swarm: docker.DockerClient
) -> OrchestratorConfig:
    return dataclasses.replace(orchestrator_config, runtime="swarm", image=core_image)


@pytest.fixture
async def on_swarm(
    swarm_config: OrchestratorConfig, swarm: docker.DockerClient
) -> AsyncIterator[OrchestratorUnderTest]:
    running = await start_orchestrator(swarm_config)
    try:
        yield running
    finally:
        await running.close()
        await asyncio.to_thread(remove_instance, swarm, swarm_config.resolved_instance_id())


@pytest.fixture
async def runtime(core_image: str, swarm: docker.DockerClient) -> AsyncIterator[SwarmRuntime]:
    runtime = SwarmRuntime(
        image=core_image, instance_id=f"test-swarm-{id(swarm):x}-{asyncio.get_running_loop().time():.0f}"
    )
    yield runtime
    await runtime.close()
    await asyncio.to_thread(remove_instance, swarm, runtime.instance_id)


def service_of(client: docker.DockerClient, handle: str) -> dict:
    return client.api.inspect_service(handle)


async def test_a_session_on_swarm_is_created_used_saved_and_deleted(
    on_swarm: OrchestratorUnderTest,
    swarm: docker.DockerClient,
) -> None:
    stub = on_swarm.stub
    session = await create_ready(on_swarm, template="node-basic", labels={"user": "ada"})
    assert session.runtime == "swarm" and session.phases[0].detail.startswith("swarm ")
    assert (await http_get(session.preview_url))[0] == 200
    assert (await shell_output(session, "id -u; echo hello > /app/note.txt; cat /app/note.txt")).split() == [
        "1000",
        "hello",
    ]

    [service] = swarm.api.services(filters={"label": f"{SESSION_LABEL}={session.id}"})
    assert service["Spec"]["Labels"]["user"] == "ada"
    assert service["Spec"]["Labels"][ORCHESTRATOR_LABEL] == on_swarm.config.resolved_instance_id()
    saved = (await stub.SaveSession(pb.SaveSessionRequest(id=session.id))).archive
    assert saved.session_id == session.id and saved.files >= 4

    await stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    assert (await stub.GetSession(pb.GetSessionRequest(id=session.id))).session.state == STOPPED
    assert swarm.api.services(filters={"id": service["ID"]}) == []
    name = service["Spec"]["Name"]
    assert swarm.api.secrets(filters={"label": f"workspace-core.service={name}"}) == [], "the token's secret is removed"
    with pytest.raises(OSError):
        await http_get(session.preview_url)

    restored = await create_ready(on_swarm, archive_id=saved.id)
    assert (await shell_output(restored, "cat /app/note.txt")).strip() == "hello"


async def test_the_token_secret_a_workspace_can_read_is_refused_once_the_session_has_its_own(
    on_swarm: OrchestratorUnderTest,
) -> None:
    session = await create_ready(on_swarm, template="node-basic")
    readable = (await shell_output(session, f"cat {TOKEN_SECRET_PATH}")).strip()

    assert readable and readable != session.agent_token
    assert await refused(session, readable) == grpc.StatusCode.UNAUTHENTICATED
    healthy = next(phase for phase in session.phases if phase.phase == pb.PHASE_AGENT_HEALTHY)
    assert "Claim" in healthy.detail


async def test_a_service_is_hardened_and_limited_like_a_container(
    runtime: SwarmRuntime,
    swarm: docker.DockerClient,
) -> None:
    workspace = await runtime.start(
        "ws-hardened", "the-token", resources=HINTS, env={"GREETING": "hi"}, labels={"team": "x"}
    )
    spec = service_of(swarm, workspace.handle)["Spec"]
    container = spec["TaskTemplate"]["ContainerSpec"]
    assert spec["Labels"] == {
        "team": "x",
        MANAGED_LABEL: "true",
        ORCHESTRATOR_LABEL: runtime.instance_id,
        SESSION_LABEL: "ws-hardened",
    }
    assert (container["User"], container["ReadOnly"], container["CapabilityDrop"]) == ("1000:1000", True, ["ALL"])
    assert spec["TaskTemplate"]["Resources"]["Limits"] == {
        "MemoryBytes": 384 * 2**20,
        "NanoCPUs": 500_000_000,
        "Pids": 200,
    }
    assert spec["EndpointSpec"]["Mode"] == "dnsrr"
    assert container["Healthcheck"]["Interval"] == 1_000_000_000
    assert not any("the-token" in variable for variable in container.get("Env", []))
    [secret] = container["Secrets"]
    assert (secret["File"]["Name"], secret["File"]["UID"], secret["File"]["Mode"]) == (TOKEN_SECRET_PATH, "1000", 0o400)

    [task] = swarm.api.tasks(filters={"service": workspace.handle})
    host_config = swarm.api.inspect_container(task["Status"]["ContainerStatus"]["ContainerID"])["HostConfig"]
    assert (host_config["Memory"], host_config["NanoCpus"], host_config["PidsLimit"]) == (384 * 2**20, 500_000_000, 200)
    assert host_config["ReadonlyRootfs"] and host_config["CapDrop"] == ["ALL"]
    assert workspace.agent_endpoint.startswith("127.0.0.1:")

    from orchestrator.agent_client import AgentClient

    agent = AgentClient(workspace.agent_endpoint, "the-token")
    try:
        await agent.wait_healthy(30)
        lines: list[str] = []
        shell = 'echo "$GREETING"; find / -xdev -perm /6000 -type f 2>/dev/null | wc -l; touch /usr/x 2>/dev/null || echo ro'
        assert await agent.run(shell, on_line=lambda text, _: lines.append(text)) == 0
        assert lines == ["hi", "0", "ro"], (
            "no setuid/setgid file to gain privileges by; the root filesystem is read-only"
        )
    finally:
        await agent.close()
    await runtime.stop("ws-hardened")
    assert await runtime.list() == []


async def test_a_restarted_orchestrator_adopts_its_services_and_stops_vanished_sessions(
    on_swarm: OrchestratorUnderTest,
    swarm: docker.DockerClient,
) -> None:
    kept, lost = await asyncio.gather(
        create_ready(on_swarm, template="node-basic"), create_ready(on_swarm, template="node-basic")
    )
    await on_swarm.orchestrator.runtime.stop(lost.id)
    await on_swarm.close()

    restarted = await start_orchestrator(on_swarm.config)
    on_swarm.channel, on_swarm.orchestrator = restarted.channel, restarted.orchestrator  # fixture cleanup
    adopted = (await restarted.stub.GetSession(pb.GetSessionRequest(id=kept.id))).session
    assert adopted.state == READY and adopted.agent_endpoint == kept.agent_endpoint
    assert (await shell_output(adopted, "echo still here")).strip() == "still here"
    vanished = (await restarted.stub.GetSession(pb.GetSessionRequest(id=lost.id))).session
    assert vanished.state == STOPPED and "vanished" in vanished.stop_reason


async def test_a_session_takes_a_warm_pool_service_with_its_templates_limits(
    swarm_config: OrchestratorConfig,
    swarm: docker.DockerClient,
) -> None:
    derive_template(
        swarm_config.templates_dir, "limited", env={"PROBE": "from the template"},
        resources={"memory_mb": 384, "cpus": 0.5, "pids": 200},
    )  # fmt: skip
    config = dataclasses.replace(swarm_config, warm_pool=1)
    running = await start_orchestrator(config)
    try:
        assert await pool_of(running).wait_full(90)
        [member] = swarm.api.services(
            filters={"label": f"{POOL_LABEL}=warm"} | {"label": f"{ORCHESTRATOR_LABEL}={config.resolved_instance_id()}"}
        )
        assert SESSION_LABEL not in member["Spec"]["Labels"]
        session = await create_ready(running, template="limited")
        assert from_pool(session), session.phases[0].detail
        assert (await shell_output(session, 'echo "$PROBE"')).strip() == "from the template"
        claimed = service_of(swarm, member["ID"])
        assert claimed["Spec"]["Labels"][SESSION_LABEL] == session.id
        [task] = [t for t in swarm.api.tasks(filters={"service": member["ID"]}) if t["Status"]["State"] == "running"]
        host_config = swarm.api.inspect_container(task["Status"]["ContainerStatus"]["ContainerID"])["HostConfig"]
        assert (host_config["Memory"], host_config["NanoCpus"], host_config["PidsLimit"]) == (
            384 * 2**20,
            500_000_000,
            200,
        )
        assert len(swarm.api.tasks(filters={"service": member["ID"]})) == 1, "the claim did not replace the task"
    finally:
        await running.close()
        await asyncio.to_thread(remove_instance, swarm, config.resolved_instance_id())


async def test_two_claims_of_one_pool_service_cannot_both_succeed(runtime: SwarmRuntime) -> None:
    member = await runtime.start_pooled("p1", "pool-credential")
    other = SwarmRuntime(image=runtime.image, instance_id=runtime.instance_id)
    try:
        results = await asyncio.gather(
            runtime.claim(member, "ws-a", resources=ResourceHints()), other.claim(member, "ws-b", resources=ResourceHints()),
            return_exceptions=True,
        )  # fmt: skip
    finally:
        await other.close()
    assert sorted(type(result).__name__ for result in results) == ["FailedPrecondition", "Workspace"], results
    assert [w.session_id for w in await runtime.list()] in (["ws-a"], ["ws-b"])
    with pytest.raises(FailedPrecondition):
        await runtime.claim(member, "ws-c", resources=ResourceHints())


async def test_a_task_whose_container_never_starts_is_made_afresh_then_refused_with_the_engines_reason(
    core_image: str, swarm: docker.DockerClient, caplog: pytest.LogCaptureFixture
) -> None:
    # A real start failure (no such entrypoint) stands in for the engine's start race (moby/moby#48783), which
    # cannot be made to happen on purpose: both end the task before its container ever ran.
    instance_id = f"test-swarm-nostart-{asyncio.get_running_loop().time():.0f}"
    tag = f"workspace-core-nostart-test:{instance_id}"
    dockerfile = io.BytesIO(f'FROM {core_image}\nENTRYPOINT ["/no/such/agent"]\n'.encode())
    await asyncio.to_thread(swarm.images.build, fileobj=dockerfile, tag=tag, rm=True)
    runtime = SwarmRuntime(image=tag, instance_id=instance_id)
    try:
        reason = r"\(3 attempts\).*starting container failed.*/no/such/agent"
        with (
            caplog.at_level(logging.WARNING, logger="orchestrator.runtime.swarm"),
            pytest.raises(FailedPrecondition, match=reason),
        ):
            await runtime.start("ws-nostart", "token", resources=ResourceHints(), env={}, labels={})
        assert len([r for r in caplog.records if "starting it afresh" in r.getMessage()]) == 2
        selector = {"label": f"{ORCHESTRATOR_LABEL}={instance_id}"}
        assert swarm.services.list(filters=selector) == []
        assert swarm.secrets.list(filters=selector) == []
    finally:
        await runtime.close()
        await asyncio.to_thread(remove_instance, swarm, instance_id)
        swarm.images.remove(tag, force=True)  # (the failed tasks' containers go a moment after their services)


async def test_a_workspace_that_stops_comes_back_from_its_last_save(
    on_swarm: OrchestratorUnderTest,
    swarm: docker.DockerClient,
) -> None:
    stub = on_swarm.stub
    session = await create_ready(on_swarm, template="node-basic")
    await shell_output(session, "echo saved > /app/kept.txt")
    saved = (await stub.SaveSession(pb.SaveSessionRequest(id=session.id))).archive
    await shell_output(session, "echo unsaved > /app/lost.txt")
    [service] = swarm.api.services(filters={"label": f"{SESSION_LABEL}={session.id}"})
    [task] = swarm.api.tasks(filters={"service": service["ID"]})
    # The workspace's container dies under it (as on a node that goes away: its volumes are gone too).
    await asyncio.to_thread(swarm.api.kill, task["Status"]["ContainerStatus"]["ContainerID"])

    async with asyncio.timeout(120):  # bounds a hang only
        while True:
            back = (await stub.GetSession(pb.GetSessionRequest(id=session.id))).session
            again = [p for p in back.phases if p.phase == pb.PHASE_CONTAINER_STARTED][1:]
            if again and back.state in (READY, FAILED, STOPPED):
                break
            await asyncio.sleep(0.5)
    assert back.state == READY, back.failure
    assert back.archive_id == saved.id
    assert "from its last save" in again[-1].detail and saved.id in again[-1].detail, again[-1].detail
    assert (await shell_output(back, "cat /app/kept.txt; ls /app/lost.txt 2>&1 >/dev/null | wc -l")).split() == [
        "saved",
        "1",
    ]
