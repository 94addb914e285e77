"""Session lifecycle through the real gRPC server with the local runtime: create, watch, preview, edit,
save, delete, restore, failures, bad input, restart, concurrency, reaping."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import os
import signal
import tarfile
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from orchestrator.agent_client import AgentClient
from orchestrator.config import OrchestratorConfig
from tests.conftest import status_of
from tests.orchestrator.conftest import (
    OrchestratorUnderTest,
    derive_template,
    http_get,
    start_orchestrator,
    stop_all_workspaces,
    watch_until_settled,
)
from workspace.agent.v1 import agent_pb2, agent_pb2_grpc
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

READY, FAILED, STOPPED = pb.SESSION_STATE_READY, pb.SESSION_STATE_FAILED, pb.SESSION_STATE_STOPPED
PHASES = [
    pb.PHASE_CONTAINER_STARTED,
    pb.PHASE_AGENT_HEALTHY,
    pb.PHASE_ARCHIVE_INJECTED,
    pb.PHASE_INSTALL,
    pb.PHASE_DEV_SERVER_STARTED,
    pb.PHASE_READY,
]


async def create_ready(o: OrchestratorUnderTest, **source) -> pb.Session:
    created = await o.stub.CreateSession(pb.CreateSessionRequest(**source))
    events = await watch_until_settled(o.stub, created.session.id)
    session = events[-1].session
    assert session.state == READY, session.failure
    return session


async def write_file(session: pb.Session, path: str, content: bytes) -> None:
    async with aio.insecure_channel(session.agent_endpoint) as channel:
        await agent_pb2_grpc.AgentServiceStub(channel).Edit(
            agent_pb2.EditRequest(
                operations=[agent_pb2.EditOperation(write=agent_pb2.WriteFile(path=path, content=content))]
            ),
            metadata=(("authorization", f"Bearer {session.agent_token}"),),
        )


BOTH_RUNTIMES = pytest.mark.parametrize("runtime_kind", ["local", pytest.param("docker", marks=pytest.mark.docker)])


@BOTH_RUNTIMES
async def test_create_watch_edit_save_delete_restore(orchestrator: OrchestratorUnderTest) -> None:
    stub = orchestrator.stub
    created = await stub.CreateSession(pb.CreateSessionRequest(template="node-basic", labels={"user": "ada"}))
    assert created.session.id.startswith("ws-") and created.session.state != READY
    # Two watchers see the same progress, phases in order, each timed.
    first, second = await asyncio.gather(
        watch_until_settled(stub, created.session.id), watch_until_settled(stub, created.session.id)
    )
    session = first[-1].session
    assert session.state == READY, session.failure
    assert [p.phase for p in session.phases] == PHASES
    assert all(p.outcome == pb.PHASE_OUTCOME_SUCCEEDED for p in session.phases if p.phase != pb.PHASE_INSTALL)
    assert session.phases[3].outcome == pb.PHASE_OUTCOME_SKIPPED  # node-basic installs nothing
    assert all(p.HasField("duration") and p.HasField("ended_at") for p in session.phases)
    assert second[-1].session.state == READY
    assert any(e.output.text.startswith("node-basic listening") for e in first), "dev server output is streamed"

    status, body = await http_get(session.preview_url)
    assert status == 200 and "<" in body
    await write_file(session, "src/index.html", b"<h1>edited through the agent</h1>")
    assert await http_get(session.preview_url) == (200, "<h1>edited through the agent</h1>")

    saved = (await stub.SaveSession(pb.SaveSessionRequest(id=session.id, name="my work"))).archive
    assert (saved.name, saved.template, saved.session_id) == ("my work", "node-basic", session.id)
    assert saved.source == pb.ARCHIVE_SOURCE_SAVED and saved.files >= 3 and len(saved.sha256) == 64
    listed = await stub.ListArchives(pb.ListArchivesRequest(session_id=session.id))
    assert [a.id for a in listed.archives] == [saved.id]

    await stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    stopped = (await stub.GetSession(pb.GetSessionRequest(id=session.id))).session
    assert (stopped.state, stopped.stop_reason) == (STOPPED, "deleted")
    with pytest.raises(OSError):
        await http_get(session.preview_url)

    restored = await create_ready(orchestrator, archive_id=saved.id)
    assert (restored.template, restored.archive_id) == ("node-basic", saved.id)
    assert await http_get(restored.preview_url) == (200, "<h1>edited through the agent</h1>")

    # Deleting a stopped session removes its record; the archive stays.
    await stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    with pytest.raises(aio.AioRpcError) as error:
        await stub.GetSession(pb.GetSessionRequest(id=session.id))
    assert status_of(error.value) == grpc.StatusCode.NOT_FOUND
    assert [a.id for a in (await stub.ListArchives(pb.ListArchivesRequest())).archives] == [saved.id]


@pytest.mark.parametrize(
    ("template", "phase", "reason", "output"),
    [
        ("failing-install", pb.PHASE_INSTALL, "exited with code 3", "npm ERR! 404 no-such-package"),
        ("dying-dev", pb.PHASE_READY, "exited before answering", "Error: port in use"),
    ],
)
async def test_a_failing_phase_marks_the_session_failed_with_reason_and_output(
    orchestrator: OrchestratorUnderTest, template: str, phase: int, reason: str, output: str
) -> None:
    created = await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template=template))
    session = (await watch_until_settled(orchestrator.stub, created.session.id))[-1].session
    assert session.state == FAILED
    assert session.failure.phase == phase
    assert reason in session.failure.reason
    assert output in session.failure.last_output
    assert session.phases[-1].outcome == pb.PHASE_OUTCOME_FAILED
    # The record says the same to a later reader.
    again = (await orchestrator.stub.GetSession(pb.GetSessionRequest(id=session.id))).session
    assert again.failure == session.failure


async def test_bad_input_gets_precise_status_codes(orchestrator: OrchestratorUnderTest) -> None:
    stub = orchestrator.stub
    calls = [
        (stub.CreateSession(pb.CreateSessionRequest(template="no-such-template")), grpc.StatusCode.NOT_FOUND),
        (stub.CreateSession(pb.CreateSessionRequest(template="invalid")), grpc.StatusCode.FAILED_PRECONDITION),
        (stub.CreateSession(pb.CreateSessionRequest(archive_id="ar-none")), grpc.StatusCode.NOT_FOUND),
        (stub.CreateSession(pb.CreateSessionRequest()), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.GetSession(pb.GetSessionRequest(id="ws-none")), grpc.StatusCode.NOT_FOUND),
        (stub.DeleteSession(pb.DeleteSessionRequest(id="ws-none")), grpc.StatusCode.NOT_FOUND),
        (stub.SaveSession(pb.SaveSessionRequest(id="ws-none")), grpc.StatusCode.NOT_FOUND),
        (stub.DeleteArchive(pb.DeleteArchiveRequest(id="ar-none")), grpc.StatusCode.NOT_FOUND),
        (stub.ListSessions(pb.ListSessionsRequest(page_token="bogus")), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, code in calls:
        with pytest.raises(aio.AioRpcError) as error:
            await call
        assert status_of(error.value) == code, error.value.details()
    with pytest.raises(aio.AioRpcError) as error:
        async for _ in stub.WatchSession(pb.WatchSessionRequest(id="ws-none")):
            pass
    assert status_of(error.value) == grpc.StatusCode.NOT_FOUND
    assert (await stub.ListSessions(pb.ListSessionsRequest())).sessions == []


async def test_upload_then_restore(orchestrator: OrchestratorUnderTest) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(orchestrator.config.templates_dir / "node-basic", arcname=".")
    data = buffer.getvalue()

    async def requests(expected: str):
        yield pb.UploadArchiveRequest(
            spec=pb.UploadArchiveSpec(name="imported", template="node-basic", expected_sha256=expected)
        )
        for start in range(0, len(data), 4096):
            yield pb.UploadArchiveRequest(chunk=data[start : start + 4096])

    with pytest.raises(aio.AioRpcError) as error:
        await orchestrator.stub.UploadArchive(requests("0" * 64))
    assert status_of(error.value) == grpc.StatusCode.DATA_LOSS
    uploaded = (await orchestrator.stub.UploadArchive(requests(hashlib.sha256(data).hexdigest()))).archive
    assert uploaded.source == pb.ARCHIVE_SOURCE_UPLOADED and uploaded.size == len(data)

    session = await create_ready(orchestrator, archive_id=uploaded.id)
    status, body = await http_get(session.preview_url)
    assert status == 200 and body == (orchestrator.config.templates_dir / "node-basic/src/index.html").read_text()


@BOTH_RUNTIMES
async def test_restart_adopts_running_sessions_and_marks_vanished_ones(
    orchestrator: OrchestratorUnderTest,
) -> None:
    kept, lost = await asyncio.gather(
        create_ready(orchestrator, template="node-basic"), create_ready(orchestrator, template="node-basic")
    )
    # One workspace vanishes behind the orchestrator's back, then it stops as on SIGTERM.
    await orchestrator.orchestrator.runtime.stop(lost.id)
    await orchestrator.close()

    restarted = await start_orchestrator(orchestrator.config)
    orchestrator.channel, orchestrator.orchestrator = restarted.channel, restarted.orchestrator  # fixture cleanup
    adopted = (await restarted.stub.GetSession(pb.GetSessionRequest(id=kept.id))).session
    assert adopted.state == READY and adopted.agent_token == kept.agent_token
    assert (await http_get(adopted.preview_url))[0] == 200
    vanished = (await restarted.stub.GetSession(pb.GetSessionRequest(id=lost.id))).session
    assert vanished.state == STOPPED and "vanished" in vanished.stop_reason
    # Still usable: the agent answers with the same token, and the session can be saved.
    await write_file(adopted, "src/index.html", b"after the restart")
    assert await http_get(adopted.preview_url) == (200, "after the restart")
    saved = (await restarted.stub.SaveSession(pb.SaveSessionRequest(id=kept.id))).archive
    assert saved.session_id == kept.id


async def test_a_watch_ends_with_the_settled_session_even_when_it_settles_while_the_snapshot_is_sent(
    orchestrator: OrchestratorUnderTest,
) -> None:
    created = (await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))).session
    # A slow reader: the snapshot is taken while the session starts, and the session settles before the
    # reader has taken the rest of it (CI saw the stream end on a snapshot output line then).
    slow = orchestrator.orchestrator.sessions.watch(created.id)
    first = await anext(slow)
    assert first.session.state not in (READY, FAILED, STOPPED)
    settled = (await watch_until_settled(orchestrator.stub, created.id))[-1].session
    assert settled.state == READY, settled.failure
    rest = [event async for event in slow]
    assert rest[-1].session.state == READY, rest[-1]

    # Watched once it settled: the snapshot's history, then the session again, last.
    after = await watch_until_settled(orchestrator.stub, created.id)
    assert after[0].session.state == after[-1].session.state == READY
    assert [e.phase.phase for e in after if e.HasField("phase")] == PHASES


async def test_ten_concurrent_creates_all_become_ready(orchestrator: OrchestratorUnderTest) -> None:
    sessions = await asyncio.gather(
        *(
            orchestrator.stub.CreateSession(
                pb.CreateSessionRequest(template="node-basic", labels={"batch": "b", "n": str(n)})
            )
            for n in range(10)
        )
    )
    ready = await asyncio.gather(*(watch_until_settled(orchestrator.stub, s.session.id) for s in sessions))
    finals = [events[-1].session for events in ready]
    assert [s.state for s in finals] == [READY] * 10, [s.failure.reason for s in finals]
    assert len({s.preview_url for s in finals}) == 10
    assert [status for status, _ in await asyncio.gather(*(http_get(s.preview_url) for s in finals))] == [200] * 10

    # Listing by label, paged.
    seen, token = [], ""
    while True:
        page = await orchestrator.stub.ListSessions(
            pb.ListSessionsRequest(labels={"batch": "b"}, states=[READY], page_size=4, page_token=token)
        )
        seen += [s.id for s in page.sessions]
        if not (token := page.next_page_token):
            break
    assert sorted(seen) == sorted(s.id for s in finals) and len(seen) == 10
    only = await orchestrator.stub.ListSessions(pb.ListSessionsRequest(labels={"n": "3"}))
    assert [s.labels["n"] for s in only.sessions] == ["3"]


@pytest.fixture
async def impatient_orchestrator(orchestrator_config: OrchestratorConfig) -> AsyncIterator[OrchestratorUnderTest]:
    """An orchestrator whose idle TTL is one second."""
    config = dataclasses.replace(orchestrator_config, idle_ttl_s=1.0)
    running = await start_orchestrator(config)
    try:
        yield running
    finally:
        await running.close()
        await stop_all_workspaces(config)


async def test_reaper_stops_idle_sessions_but_not_busy_ones(impatient_orchestrator: OrchestratorUnderTest) -> None:
    orchestrator = impatient_orchestrator
    idle, busy = await asyncio.gather(
        create_ready(orchestrator, template="node-basic"), create_ready(orchestrator, template="node-basic")
    )
    # A long build in one workspace: a command running besides the dev server.
    client = AgentClient(busy.agent_endpoint, busy.agent_token)
    build = asyncio.create_task(client.run("sleep 30", on_line=lambda text, stderr: None))
    await asyncio.sleep(1.2)

    reaped = await orchestrator.orchestrator.reaper.sweep()
    build.cancel()
    await client.close()
    assert [session_id for session_id, _ in reaped] == [idle.id]
    stopped = (await orchestrator.stub.GetSession(pb.GetSessionRequest(id=idle.id))).session
    assert stopped.state == STOPPED and stopped.stop_reason.startswith("idle for")
    assert (await orchestrator.stub.GetSession(pb.GetSessionRequest(id=busy.id))).session.state == READY


async def state_becomes(o: OrchestratorUnderTest, session_id: str, state: int, timeout: float = 60) -> pb.Session:
    """The session once GetSession shows it in `state` (`timeout` only bounds a hang)."""
    async with asyncio.timeout(timeout):
        while (session := (await o.stub.GetSession(pb.GetSessionRequest(id=session_id))).session).state != state:
            await asyncio.sleep(0.1)
    return session


@BOTH_RUNTIMES
async def test_a_workspace_gone_behind_the_orchestrators_back_fails_its_session_and_frees_its_slot(
    request: pytest.FixtureRequest, orchestrator_config: OrchestratorConfig, runtime_kind: str
) -> None:
    config = dataclasses.replace(orchestrator_config, max_sessions=1)
    o = await start_orchestrator(config)
    try:
        if runtime_kind == "docker":
            docker_client = request.getfixturevalue("docker_client")
            ways = [
                (lambda handle: docker_client.containers.get(handle).remove(force=True),
                 "the container was removed outside the orchestrator"),
                (lambda handle: docker_client.containers.get(handle).kill(),
                 "the container exited with code 137 (SIGKILL)"),
            ]  # fmt: skip
        else:
            ways = [(lambda handle: os.kill(int(handle), signal.SIGKILL), "the agent process was killed by SIGKILL")]
        for end, reason in ways:
            # With max_sessions=1 each round's create needs the slot the previous round's session held.
            session = await create_ready(o, template="node-basic")
            [workspace] = await o.orchestrator.runtime.list()
            await asyncio.to_thread(end, workspace.handle)

            failed = await state_becomes(o, session.id, FAILED)
            assert failed.failure.reason == reason
            assert failed.failure.phase == pb.PHASE_READY
            # Nothing of it is left behind (an exited container is removed too).
            assert [w.session_id for w in await o.orchestrator.runtime.list()] == []
    finally:
        await o.close()
        await stop_all_workspaces(config)


async def test_a_workspace_dying_during_initialization_says_so_in_the_failure(
    orchestrator: OrchestratorUnderTest, templates
) -> None:
    # An install that kills the agent it runs under: the failure must tell what happened to the workspace.
    derive_template(templates, "agent-killer", install_command="kill -9 $PPID; sleep 60")
    created = await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template="agent-killer"))
    session = (await watch_until_settled(orchestrator.stub, created.session.id))[-1].session
    assert session.state == FAILED and session.failure.phase == pb.PHASE_INSTALL
    async with asyncio.timeout(30):  # bounds a hang only
        while "the agent process was killed by SIGKILL" not in session.failure.reason:
            await asyncio.sleep(0.1)
            session = (await orchestrator.stub.GetSession(pb.GetSessionRequest(id=session.id))).session
    assert session.state == FAILED
