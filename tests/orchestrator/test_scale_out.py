"""The scaled-out deployment as a whole: two orchestrator processes, each with a data dir of its own, running
workspaces on a single-node swarm on loopback, their state in one PostgreSQL database and their archives in one
S3 bucket (SeaweedFS). Every call answered by either replica, a killed replica's sessions taken over by the other,
a workspace that stops made again by its owner from its last save in the bucket, and the reaper stopping each
session once."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest
from grpc import aio

from orchestrator.config import OrchestratorConfig
from orchestrator.runtime.base import SESSION_LABEL
from tests.orchestrator.conftest import stop_all_workspaces, watch_until_settled
from tests.orchestrator.replica_support import Replica, Replicas
from tests.orchestrator.test_archives_s3 import PREFIX, archive_key
from tests.orchestrator.test_warm_pool import create_ready_on, shell_output
from tests.s3_server import S3Bucket
from tests.swarm_support import remove_instance
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

pytestmark = [pytest.mark.docker, pytest.mark.postgres]

READY, STOPPED = pb.SESSION_STATE_READY, pb.SESSION_STATE_STOPPED
LEASE_TTL_S = 3.0
# How long a dead replica's sessions may wait for a new owner: the stated bound (the lease and one beat, see
# Cluster.takeover_within_s) plus room for a slow shared machine (the adoption's health check, a busy engine).
TAKEOVER_DEADLINE_S = LEASE_TTL_S * 4 / 3 + 30
IDLE_TTL_S = 5


@dataclass
class ScaledOut:
    replicas: Replicas
    swarm: docker.DockerClient
    bucket: S3Bucket

    def start(self, *flags: str) -> Replica:
        return self.replicas.start(*flags)

    def services_of(self, session_id: str) -> list[dict[str, Any]]:
        return self.swarm.api.services(filters={"label": f"{SESSION_LABEL}={session_id}"})


@pytest.fixture
async def scaled_out(
    tmp_path: Path,
    templates: Path,
    core_image: str,
    swarm: docker.DockerClient,
    postgres_url: str,
    s3: S3Bucket,
) -> AsyncIterator[ScaledOut]:
    config = OrchestratorConfig(
        data_dir=tmp_path / "unused", templates_dir=templates, runtime="swarm", image=core_image,
        instance_id=f"test-{secrets.token_hex(4)}", archive_store=f"s3://{s3.name}/{PREFIX}",
    )  # fmt: skip
    replicas = Replicas(
        config, postgres_url, tmp_path, lease_ttl_s=LEASE_TTL_S, shared_data_dir=False, env=s3.server.env()
    )
    try:
        yield ScaledOut(replicas, swarm, s3)
    finally:
        await replicas.close()
        await stop_all_workspaces(config)
        await asyncio.to_thread(remove_instance, swarm, config.instance_id)


async def test_a_session_made_on_one_replica_is_served_by_the_other(scaled_out: ScaledOut) -> None:
    first, second = scaled_out.start(), scaled_out.start()

    created = (await first.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))).session
    # Watched through the replica that does not own it: the owner's phases, up to READY.
    events = await watch_until_settled(second.stub, created.id, timeout=120)
    session = events[-1].session
    assert session.state == READY, session.failure
    assert session.runtime == "swarm"
    assert {event.phase.phase for event in events if event.HasField("phase")} >= {
        pb.PHASE_CONTAINER_STARTED,
        pb.PHASE_READY,
    }
    assert len(scaled_out.services_of(created.id)) == 1
    assert (await shell_output(session, "echo kept > /app/note.txt; cat /app/note.txt")).strip() == "kept"

    archive = (await second.stub.SaveSession(pb.SaveSessionRequest(id=created.id, name="via the other"))).archive
    assert archive.session_id == created.id and archive.files > 0
    assert scaled_out.bucket.keys(f"{PREFIX}/archives/") == [archive_key(archive)]
    on_first = (await first.stub.ListArchives(pb.ListArchivesRequest(session_id=created.id))).archives
    assert [a.id for a in on_first] == [archive.id]

    restored = await create_ready_on(first.stub, archive_id=archive.id)
    assert (await shell_output(restored, "cat /app/note.txt")).strip() == "kept"

    await second.stub.DeleteSession(pb.DeleteSessionRequest(id=created.id))
    after = (await first.stub.GetSession(pb.GetSessionRequest(id=created.id))).session
    assert after.state == STOPPED and after.stop_reason == "deleted"
    assert scaled_out.services_of(created.id) == []
    # The restored session, also deleted through the replica that does not own it.
    await second.stub.DeleteSession(pb.DeleteSessionRequest(id=restored.id))
    assert scaled_out.services_of(restored.id) == []


async def test_a_killed_replicas_sessions_are_taken_over(scaled_out: ScaledOut) -> None:
    first, second = scaled_out.start(), scaled_out.start()
    ready = await create_ready_on(first.stub, template="node-basic")
    await shell_output(ready, "echo before > /app/note.txt")

    first.kill()
    # The dead owner's session, saved through the survivor once it took the session over: until then the
    # survivor answers UNAVAILABLE, saying when to try again.
    async with asyncio.timeout(TAKEOVER_DEADLINE_S):
        while True:
            try:
                archive = (await second.stub.SaveSession(pb.SaveSessionRequest(id=ready.id))).archive
                break
            except aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                await asyncio.sleep(0.5)
    assert scaled_out.bucket.keys(f"{PREFIX}/archives/") == [archive_key(archive)]
    adopted = (await second.stub.GetSession(pb.GetSessionRequest(id=ready.id))).session
    # The same workspace, adopted (not made again): same agent, still READY, its files as they were.
    assert (adopted.state, adopted.agent_endpoint) == (READY, ready.agent_endpoint)
    assert (await shell_output(adopted, "cat /app/note.txt; echo after")).split() == ["before", "after"]

    await second.stub.DeleteSession(pb.DeleteSessionRequest(id=ready.id))
    assert (await second.stub.GetSession(pb.GetSessionRequest(id=ready.id))).session.state == STOPPED
    assert scaled_out.services_of(ready.id) == []


async def test_the_reaper_stops_each_idle_session_once(scaled_out: ScaledOut) -> None:
    flags = ("--idle-ttl", str(IDLE_TTL_S), "--reap-interval", "1", "--save-before-reap")
    replicas = [scaled_out.start(*flags), scaled_out.start(*flags)]
    ids = [
        (await replica.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))).session.id
        for replica in replicas
    ]
    for n, session_id in enumerate(ids):
        other = replicas[1 - n]  # read through the replica that does not own it
        async with asyncio.timeout(180):
            while (
                session := (await other.stub.GetSession(pb.GetSessionRequest(id=session_id))).session
            ).state != STOPPED:
                await asyncio.sleep(0.5)
        assert session.stop_reason.startswith("idle for"), session
        assert session.stop_reason.endswith(f"(idle TTL {IDLE_TTL_S}s)")
        assert scaled_out.services_of(session_id) == []
    await asyncio.sleep(2)  # two more sweeps of each reaper: none may stop (or save) a session again
    saved: list[pb.Archive] = []
    for session_id in ids:
        archives = (await replicas[0].stub.ListArchives(pb.ListArchivesRequest(session_id=session_id))).archives
        assert [archive.name for archive in archives] == [f"{session_id} before reaping"]
        saved.extend(archives)
    assert scaled_out.bucket.keys(f"{PREFIX}/archives/") == sorted(archive_key(archive) for archive in saved)


async def test_a_workspace_that_stops_comes_back_from_its_last_save_in_the_bucket(scaled_out: ScaledOut) -> None:
    first, second = scaled_out.start(), scaled_out.start()
    session = await create_ready_on(first.stub, template="node-basic")
    await shell_output(session, "echo saved > /app/kept.txt")
    saved = (await second.stub.SaveSession(pb.SaveSessionRequest(id=session.id))).archive
    await shell_output(session, "echo unsaved > /app/lost.txt")
    [service] = scaled_out.services_of(session.id)
    [task] = scaled_out.swarm.api.tasks(filters={"service": service["ID"]})
    # The workspace's container dies under it (as on a node that goes away: its volumes are gone too). Both
    # replicas see its task end; its owner alone makes it again, from the archive in the bucket.
    await asyncio.to_thread(scaled_out.swarm.api.kill, task["Status"]["ContainerStatus"]["ContainerID"])

    async with asyncio.timeout(120):  # bounds a hang only
        while True:
            back = (await second.stub.GetSession(pb.GetSessionRequest(id=session.id))).session
            again = [p for p in back.phases if p.phase == pb.PHASE_CONTAINER_STARTED][1:]
            if again and back.state in (READY, pb.SESSION_STATE_FAILED, STOPPED):
                break
            await asyncio.sleep(0.5)
    assert back.state == READY, back.failure
    assert len(again) == 1 and "from its last save" in again[0].detail and saved.id in again[0].detail, again
    assert len(scaled_out.services_of(session.id)) == 1
    assert (await shell_output(back, "cat /app/kept.txt; ls /app/lost.txt 2>&1 >/dev/null | wc -l")).split() == [
        "saved",
        "1",
    ]
    await second.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    assert scaled_out.services_of(session.id) == []
