"""Two orchestrator processes on one PostgreSQL database: every call answered by either (a session created on one
is watched, read, saved and deleted through the other), one warm pool for both, a killed replica's sessions taken
over by the other, and the reaper stopping each session once."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from orchestrator.config import OrchestratorConfig
from orchestrator.runtime import make_runtime
from tests.orchestrator.conftest import stop_all_workspaces, watch_until_settled
from tests.orchestrator.replica_support import Replica, Replicas
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

pytestmark = pytest.mark.postgres

READY, STOPPED = pb.SESSION_STATE_READY, pb.SESSION_STATE_STOPPED
LEASE_TTL_S = 3.0
# How long a dead replica's sessions may wait for a new owner: the stated bound (the lease and one beat, see
# Cluster.takeover_within_s) plus room for a slow shared machine (the adoption's health check, a busy engine).
TAKEOVER_DEADLINE_S = LEASE_TTL_S * 4 / 3 + 30
# Saves sent at a time to a dead replica's session while it is being taken over.
CONCURRENT_SAVES = 4


@dataclass
class Cluster:
    config: OrchestratorConfig
    start: Callable[..., Replica]


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def runtime_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, templates: Path, runtime_kind: str, postgres_url: str
) -> AsyncIterator[Cluster]:
    image = request.getfixturevalue("core_image") if runtime_kind == "docker" else OrchestratorConfig.image
    config = OrchestratorConfig(
        data_dir=tmp_path / "shared", templates_dir=templates, runtime=runtime_kind, image=image,
        instance_id=f"test-{secrets.token_hex(4)}",
    )  # fmt: skip
    # One data directory for both: the shared archive directory (and, for the local runtime, its workspaces).
    replicas = Replicas(config, postgres_url, tmp_path, lease_ttl_s=LEASE_TTL_S, shared_data_dir=True)
    try:
        yield Cluster(config, replicas.start)
    finally:
        await replicas.close()
        await stop_all_workspaces(config)


async def pool_members(config: OrchestratorConfig) -> int:
    runtime = make_runtime(config.runtime, config)
    try:
        return sum(1 for workspace in await runtime.list() if workspace.pool_id)
    finally:
        await runtime.close()


async def test_a_session_made_on_one_replica_is_served_by_the_other(cluster: Cluster) -> None:
    first = cluster.start("--warm-pool", "1")
    second = cluster.start("--warm-pool", "1")

    created = (await first.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))).session
    # Watched through the replica that does not own it: the owner's phases and output, up to READY.
    events = await watch_until_settled(second.stub, created.id)
    assert events[-1].session.state == READY
    watched = [event.phase for event in events if event.HasField("phase")]
    assert {phase.phase for phase in watched} >= {pb.PHASE_CONTAINER_STARTED, pb.PHASE_READY}
    owned = (await first.stub.GetSession(pb.GetSessionRequest(id=created.id))).session
    assert owned.phases[-1] == watched[-1] and owned.state == READY

    assert (await second.stub.GetSession(pb.GetSessionRequest(id=created.id))).session == owned
    listed = (await second.stub.ListSessions(pb.ListSessionsRequest())).sessions
    assert [session.id for session in listed] == [created.id]

    archive = (await second.stub.SaveSession(pb.SaveSessionRequest(id=created.id, name="via the other"))).archive
    assert archive.session_id == created.id and archive.files > 0
    on_first = (await first.stub.ListArchives(pb.ListArchivesRequest(session_id=created.id))).archives
    assert [a.id for a in on_first] == [archive.id]

    deleted = await second.stub.DeleteSession(pb.DeleteSessionRequest(id=created.id))
    assert not deleted.HasField("archive")
    after = (await first.stub.GetSession(pb.GetSessionRequest(id=created.id))).session
    assert after.state == STOPPED and after.stop_reason == "deleted"
    with pytest.raises(aio.AioRpcError) as refused:
        await second.stub.SaveSession(pb.SaveSessionRequest(id=created.id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # One warm pool for the cluster: the leader's (the other replica keeps none).
    async with asyncio.timeout(60):
        while await pool_members(cluster.config) < 1:
            await asyncio.sleep(0.2)
    assert await pool_members(cluster.config) == 1


async def test_a_killed_replicas_sessions_are_taken_over(cluster: Cluster) -> None:
    first = cluster.start()
    second = cluster.start()
    created = (await first.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))).session
    # Killed the moment its watcher hears READY: what a watcher was told is in the database already.
    ready = (await watch_until_settled(first.stub, created.id))[-1].session
    assert ready.state == READY

    first.kill()

    # The dead owner's session, saved through the survivor once it took the session over: until then the
    # survivor answers UNAVAILABLE, saying when to try again. Several calls at a time, so that some arrive while
    # the survivor's heartbeat is taking the session over: they wait for it, none finds it half taken over.
    async def save() -> pb.Archive | None:
        try:
            return (await second.stub.SaveSession(pb.SaveSessionRequest(id=created.id))).archive
        except aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return None

    async with asyncio.timeout(TAKEOVER_DEADLINE_S):
        while not (saved := [a for a in await asyncio.gather(*(save() for _ in range(CONCURRENT_SAVES))) if a]):
            await asyncio.sleep(0.1)
    assert {archive.session_id for archive in saved} == {created.id}
    adopted = (await second.stub.GetSession(pb.GetSessionRequest(id=created.id))).session
    # The same workspace, adopted (not restarted): same agent, still READY.
    assert (adopted.state, adopted.agent_endpoint) == (READY, ready.agent_endpoint)
    await second.stub.DeleteSession(pb.DeleteSessionRequest(id=created.id))
    assert (await second.stub.GetSession(pb.GetSessionRequest(id=created.id))).session.state == STOPPED


async def test_the_reaper_stops_each_session_once(cluster: Cluster) -> None:
    flags = ("--max-lifetime", "4", "--reap-interval", "1", "--save-before-reap")
    replicas = [cluster.start(*flags), cluster.start(*flags)]
    ids = [
        (await replica.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))).session.id
        for replica in replicas
    ]
    for n, session_id in enumerate(ids):
        other = replicas[1 - n]  # read through the replica that does not own it
        async with asyncio.timeout(60):
            while (
                session := (await other.stub.GetSession(pb.GetSessionRequest(id=session_id))).session
            ).state != STOPPED:
                await asyncio.sleep(0.5)
        assert session.stop_reason == "max lifetime of 4s reached"
    await asyncio.sleep(2)  # two more sweeps of each reaper: none may stop (or save) a session again
    for session_id in ids:
        saved = (await replicas[0].stub.ListArchives(pb.ListArchivesRequest(session_id=session_id))).archives
        assert [archive.name for archive in saved] == [f"{session_id} before reaping"]
