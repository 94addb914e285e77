"""Fork, pause and resume through the real gRPC server, on the local runtime and on Docker: what a user of the
sessions sees (files, previews, tokens, states, phases), also across an orchestrator restart and the reaper."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from common.tools import ENV_BIN
from orchestrator.agent_client import AgentClient
from orchestrator.config import OrchestratorConfig
from tests.conftest import REPO, status_of
from tests.orchestrator.conftest import (
    OrchestratorUnderTest,
    derive_template,
    http_get,
    page_showing,
    start_orchestrator,
    stop_all_workspaces,
)
from tests.orchestrator.test_sessions import BOTH_RUNTIMES, PHASES, create_ready, state_becomes, write_file
from workspace.agent.v1 import agent_pb2, agent_pb2_grpc
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

READY, FAILED, PAUSED, STOPPED = (
    pb.SESSION_STATE_READY, pb.SESSION_STATE_FAILED, pb.SESSION_STATE_PAUSED, pb.SESSION_STATE_STOPPED,
)  # fmt: skip
EDITED = b"<h1>edited before the fork</h1>"


async def settled(o: OrchestratorUnderTest, session_id: str, timeout: float = 60) -> pb.Session:
    """The session once WatchSession's stream ended (it ends when the session settles; at once, after its
    snapshot, for one that settled already)."""
    async with asyncio.timeout(timeout):  # bounds a hang only
        async for _ in o.stub.WatchSession(pb.WatchSessionRequest(id=session_id)):
            pass
    session = await get(o, session_id)
    assert session.state in (READY, FAILED, STOPPED, PAUSED), session
    return session


async def get(o: OrchestratorUnderTest, session_id: str) -> pb.Session:
    return (await o.stub.GetSession(pb.GetSessionRequest(id=session_id))).session


async def read(session: pb.Session, path: str) -> bytes:
    client = AgentClient(session.agent_endpoint, session.agent_token)
    try:
        return await client.read_file(path)
    finally:
        await client.close()


async def agent_call(endpoint: str, token: str, method: str):
    """One unary call of the agent with `token`, as any client makes it."""
    request = getattr(agent_pb2, f"{method}Request")()
    async with aio.insecure_channel(endpoint) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        return await getattr(stub, method)(request, metadata=(("authorization", f"Bearer {token}"),))


async def status_from(call) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as error:
        await call
    return status_of(error.value)


async def paused(o: OrchestratorUnderTest, session_id: str) -> pb.Session:
    session = (await o.stub.PauseSession(pb.PauseSessionRequest(id=session_id))).session
    assert session.state == PAUSED and session.HasField("paused_at")
    return session


async def resumed(o: OrchestratorUnderTest, session_id: str) -> pb.Session:
    started = (await o.stub.ResumeSession(pb.ResumeSessionRequest(id=session_id))).session
    assert started.state in (pb.SESSION_STATE_STARTING, READY)
    session = await settled(o, session_id)
    assert session.state == READY, session.failure
    assert [phase.phase for phase in session.phases] == PHASES
    return session


async def workspace_running(o: OrchestratorUnderTest, session_id: str) -> bool:
    [workspace] = [w for w in await o.orchestrator.runtime.list() if w.session_id == session_id]
    return workspace.running


@BOTH_RUNTIMES
async def test_a_fork_gets_the_sources_files_and_its_own_token_and_preview(orchestrator: OrchestratorUnderTest) -> None:
    source = await create_ready(orchestrator, template="node-basic", labels={"user": "ada"})
    await write_file(source, "src/index.html", EDITED)
    source_agent = AgentClient(source.agent_endpoint, source.agent_token)
    started = await source_agent.start_process("sleeper", "sleep 600")
    try:
        forked = await orchestrator.stub.ForkSession(pb.ForkSessionRequest(id=source.id, labels={"branch": "b"}))
        assert not forked.HasField("archive")
        fork = await settled(orchestrator, forked.session.id)
        assert fork.state == READY, fork.failure
        assert (fork.forked_from, fork.template) == (source.id, "node-basic")
        assert dict(fork.labels) == {"user": "ada", "branch": "b"}
        assert "forked from " + source.id in fork.phases[2].detail
        assert fork.id != source.id and fork.preview_url != source.preview_url
        assert await http_get(fork.preview_url) == (200, EDITED.decode())

        # Each is its own: an edit in the fork leaves the source alone, and the tokens do not cross.
        await write_file(fork, "src/index.html", b"the fork's own")
        assert await page_showing(fork.preview_url, "the fork's own") == (200, "the fork's own")
        assert await http_get(source.preview_url) == (200, EDITED.decode())
        assert fork.agent_token != source.agent_token
        for endpoint, token in ((fork.agent_endpoint, source.agent_token), (source.agent_endpoint, fork.agent_token)):
            assert await status_from(agent_call(endpoint, token, "ListProcesses")) == grpc.StatusCode.UNAUTHENTICATED
        # The source's processes ran on through the fork: the same process, still running.
        listed = await agent_call(source.agent_endpoint, source.agent_token, "ListProcesses")
        [sleeper] = [process for process in listed.processes if process.name == "sleeper"]
        assert sleeper.pid == started and sleeper.running
        assert (await get(orchestrator, source.id)).state == READY
    finally:
        await source_agent.close()


async def test_fork_with_save_stores_the_source_and_forks_from_the_archive(
    orchestrator: OrchestratorUnderTest,
) -> None:
    source = await create_ready(orchestrator, template="node-basic")
    await write_file(source, "src/index.html", EDITED)
    forked = await orchestrator.stub.ForkSession(pb.ForkSessionRequest(id=source.id, save=True))
    assert forked.archive.session_id == source.id and forked.session.archive_id == forked.archive.id
    fork = await settled(orchestrator, forked.session.id)
    assert fork.state == READY and fork.forked_from == source.id
    assert await http_get(fork.preview_url) == (200, EDITED.decode())


async def test_fork_of_a_session_that_is_not_ready_is_refused(orchestrator: OrchestratorUnderTest) -> None:
    stub = orchestrator.stub
    assert await status_from(stub.ForkSession(pb.ForkSessionRequest(id="ws-nosuchthing"))) == grpc.StatusCode.NOT_FOUND
    created = await stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))
    # Still initializing: not READY.
    starting = await status_from(stub.ForkSession(pb.ForkSessionRequest(id=created.session.id)))
    assert starting == grpc.StatusCode.FAILED_PRECONDITION
    assert (await settled(orchestrator, created.session.id)).state == READY
    await paused(orchestrator, created.session.id)
    refused = await status_from(stub.ForkSession(pb.ForkSessionRequest(id=created.session.id)))
    assert refused == grpc.StatusCode.FAILED_PRECONDITION
    await stub.DeleteSession(pb.DeleteSessionRequest(id=created.session.id))
    refused = await status_from(stub.ForkSession(pb.ForkSessionRequest(id=created.session.id)))
    assert refused == grpc.StatusCode.FAILED_PRECONDITION


@BOTH_RUNTIMES
async def test_pause_stops_the_workspace_keeps_its_files_and_resume_brings_it_back(
    orchestrator: OrchestratorUnderTest,
) -> None:
    stub = orchestrator.stub
    session = await create_ready(orchestrator, template="node-basic")
    await write_file(session, "src/index.html", EDITED)
    pausing = await paused(orchestrator, session.id)
    assert not await workspace_running(orchestrator, session.id)
    with pytest.raises(OSError):
        await http_get(session.preview_url)
    # Pausing again changes nothing; a paused session is neither running nor counted as such.
    assert (await stub.PauseSession(pb.PauseSessionRequest(id=session.id))).session.paused_at == pausing.paused_at
    listed = await stub.ListSessions(pb.ListSessionsRequest(states=[PAUSED]))
    assert [s.id for s in listed.sessions] == [session.id]

    back = await resumed(orchestrator, session.id)
    assert back.phases[0].detail.startswith("resumed:")
    assert [p.outcome for p in back.phases[2:4]] == [pb.PHASE_OUTCOME_SKIPPED] * 2
    assert back.agent_token == session.agent_token
    assert await page_showing(back.preview_url, "edited before the fork") == (200, EDITED.decode())
    assert await read(back, "src/index.html") == EDITED
    # Resuming a READY session returns it as it is.
    again = (await stub.ResumeSession(pb.ResumeSessionRequest(id=session.id))).session
    assert again.state == READY and again.preview_url == back.preview_url
    # Resuming or pausing a deleted one is refused.
    await stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    for call in (stub.ResumeSession(pb.ResumeSessionRequest(id=session.id)),
                 stub.PauseSession(pb.PauseSessionRequest(id=session.id))):  # fmt: skip
        assert await status_from(call) == grpc.StatusCode.FAILED_PRECONDITION
    assert await status_from(stub.PauseSession(pb.PauseSessionRequest(id="ws-none"))) == grpc.StatusCode.NOT_FOUND


@BOTH_RUNTIMES
async def test_a_paused_session_can_be_saved_and_deleted(orchestrator: OrchestratorUnderTest) -> None:
    stub = orchestrator.stub
    session = await create_ready(orchestrator, template="node-basic")
    await write_file(session, "src/index.html", EDITED)
    running_save = (await stub.SaveSession(pb.SaveSessionRequest(id=session.id))).archive
    await paused(orchestrator, session.id)
    saved = (await stub.SaveSession(pb.SaveSessionRequest(id=session.id, name="while paused"))).archive
    # The same files make the same archive, byte for byte, paused or not.
    assert saved.sha256 == running_save.sha256 and saved.name == "while paused"
    assert (await get(orchestrator, session.id)).state == PAUSED
    assert not await workspace_running(orchestrator, session.id)

    restored = await create_ready(orchestrator, archive_id=saved.id)
    assert await http_get(restored.preview_url) == (200, EDITED.decode())
    archive = (await stub.DeleteSession(pb.DeleteSessionRequest(id=session.id, save=True))).archive
    assert archive.sha256 == saved.sha256
    assert (await get(orchestrator, session.id)).state == STOPPED
    assert [w for w in await orchestrator.orchestrator.runtime.list() if w.session_id == session.id] == []


@BOTH_RUNTIMES
async def test_a_paused_session_stays_paused_across_a_restart_and_resumes(orchestrator: OrchestratorUnderTest) -> None:
    session = await create_ready(orchestrator, template="node-basic")
    await write_file(session, "src/index.html", EDITED)
    await paused(orchestrator, session.id)
    await orchestrator.close()

    restarted = await start_orchestrator(orchestrator.config)
    orchestrator.channel, orchestrator.orchestrator = restarted.channel, restarted.orchestrator  # fixture cleanup
    assert (await get(restarted, session.id)).state == PAUSED
    assert not await workspace_running(restarted, session.id)
    back = await resumed(restarted, session.id)
    assert await page_showing(back.preview_url, "edited before the fork") == (200, EDITED.decode())


@BOTH_RUNTIMES
async def test_resume_of_a_workspace_that_is_gone_restores_the_last_save_or_fails_saying_why(
    orchestrator: OrchestratorUnderTest,
) -> None:
    stub = orchestrator.stub
    kept, lost = await asyncio.gather(
        create_ready(orchestrator, template="node-basic"), create_ready(orchestrator, template="node-basic")
    )
    await write_file(kept, "src/index.html", EDITED)
    saved = (await stub.SaveSession(pb.SaveSessionRequest(id=kept.id))).archive
    for session in (kept, lost):
        await paused(orchestrator, session.id)
        await orchestrator.orchestrator.runtime.stop(session.id)  # removed behind the orchestrator's back

    await stub.ResumeSession(pb.ResumeSessionRequest(id=kept.id))
    restored = await settled(orchestrator, kept.id)
    assert restored.state == READY, restored.failure
    assert f"restored from its last save {saved.id}" in restored.phases[0].detail
    assert restored.phases[2].outcome == pb.PHASE_OUTCOME_SUCCEEDED and saved.id in restored.phases[2].detail
    assert await http_get(restored.preview_url) == (200, EDITED.decode())

    await stub.ResumeSession(pb.ResumeSessionRequest(id=lost.id))
    failed = await settled(orchestrator, lost.id)
    assert failed.state == FAILED and failed.failure.phase == pb.PHASE_CONTAINER_STARTED
    assert "never saved" in failed.failure.reason


@pytest.fixture
async def pausing_reaper(orchestrator_config: OrchestratorConfig) -> AsyncIterator[OrchestratorUnderTest]:
    """An orchestrator whose reaper pauses sessions idle for a second."""
    config = dataclasses.replace(orchestrator_config, idle_ttl_s=1.0, idle_action="pause")
    running = await start_orchestrator(config)
    try:
        yield running
    finally:
        await running.close()
        await stop_all_workspaces(config)


async def test_the_idle_reaper_can_pause_instead_of_delete(pausing_reaper: OrchestratorUnderTest) -> None:
    o = pausing_reaper
    idle, busy = await asyncio.gather(create_ready(o, template="node-basic"), create_ready(o, template="node-basic"))
    client = AgentClient(busy.agent_endpoint, busy.agent_token)
    build = asyncio.create_task(client.run("sleep 30", on_line=lambda text, stderr: None))
    await asyncio.sleep(1.2)
    reaped = await o.orchestrator.reaper.sweep()
    build.cancel()
    await client.close()
    assert [session_id for session_id, _ in reaped] == [idle.id]
    assert (await get(o, idle.id)).state == PAUSED and not await workspace_running(o, idle.id)
    assert (await get(o, busy.id)).state == READY
    # A paused session is not swept again, and it resumes.
    assert idle.id not in [session_id for session_id, _ in await o.orchestrator.reaper.sweep()]
    await resumed(o, idle.id)


def readme_block(title: str) -> list[str]:
    """The command lines of the README section's shell block, blank lines left out."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(f"## {title}\n") :]
    (block,) = re.findall(r"```sh\n(.*?)```", section[: section.index("\n## ", 1)], re.S)
    return [line for line in block.splitlines() if line.strip()]


async def run_readme_block(o: OrchestratorUnderTest, title: str) -> tuple[str, str]:
    """Runs the section's lines as written in one bash (`set -euo pipefail`, each line echoed to stderr), for
    this environment and against this orchestrator: its stdout and stderr."""
    lines = readme_block(title)
    assert lines[:2] == [". .venv/bin/activate", "ORCH=127.0.0.1:50051"]
    address = f"127.0.0.1:{o.orchestrator.port}"
    script = ["set -euxo pipefail", f". {ENV_BIN}/activate", f"ORCH={address}", *lines[2:]]
    env = {**os.environ, "COLUMNS": "250", "WSCTL_SERVER": address}
    shell = await asyncio.create_subprocess_exec(
        "bash", "-c", "\n".join(script), cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(180):  # bounds a hang only
        stdout, stderr = await shell.communicate()
    assert shell.returncode == 0, stdout.decode() + stderr.decode()
    return stdout.decode(), stderr.decode()


async def test_the_readme_fork_lines_work_as_written(orchestrator: OrchestratorUnderTest) -> None:
    stdout, _ = await run_readme_block(orchestrator, "Fork")
    assert "<h1>Forked from node-basic</h1>" in stdout
    sessions = (await orchestrator.stub.ListSessions(pb.ListSessionsRequest())).sessions
    [source] = [s for s in sessions if not s.forked_from]
    forks = [s for s in sessions if s.forked_from]
    assert sorted(s.labels["branch"] for s in forks) == ["try", "two"]
    assert all(s.forked_from == source.id and s.state == STOPPED for s in forks)
    assert re.search(rf"forked from {source.id}", stdout)  # the sessions list note
    assert f'"{source.id}"' in stdout  # the grpcurl watch's forked_from


async def test_the_readme_pause_lines_work_as_written(orchestrator: OrchestratorUnderTest) -> None:
    stdout, stderr = await run_readme_block(orchestrator, "Pause and resume")
    assert "<h1>Paused in node-basic</h1>" in stdout
    assert re.search(r"^SESSION_STATE_PAUSED\nSESSION_STATE_STARTING\n", stdout, re.M), stdout
    assert stdout.rstrip().endswith('"SESSION_STATE_READY"'), stdout
    assert "paused ws-" in stderr and "deleted ws-" in stderr
    [session] = (await orchestrator.stub.ListSessions(pb.ListSessionsRequest())).sessions
    [archive] = (await orchestrator.stub.ListArchives(pb.ListArchivesRequest(session_id=session.id))).archives
    assert session.state == STOPPED and archive.files >= 3


@BOTH_RUNTIMES
async def test_forks_and_resumes_of_warm_pool_workspaces(orchestrator_config: OrchestratorConfig, templates) -> None:
    derive_template(templates, "with-env", env={"GREETING": "hello from the template"})
    config = dataclasses.replace(orchestrator_config, warm_pool=1)
    o = await start_orchestrator(config)
    try:
        pool = o.orchestrator.sessions.pool
        assert pool is not None
        assert await pool.wait_full(60)  # bounds a hang only
        source = await create_ready(o, template="with-env")
        assert source.phases[0].detail.endswith("(from the warm pool)")
        await write_file(source, "src/index.html", EDITED)
        assert await pool.wait_full(60)
        fork = await settled(o, (await o.stub.ForkSession(pb.ForkSessionRequest(id=source.id))).session.id)
        assert fork.state == READY and fork.phases[0].detail.endswith("(from the warm pool)")
        assert await http_get(fork.preview_url) == (200, EDITED.decode())
        # A claimed member's token was handed over by a Claim: a resume delivers it as to any workspace.
        await paused(o, source.id)
        back = await resumed(o, source.id)
        assert await page_showing(back.preview_url, "edited before the fork") == (200, EDITED.decode())
        assert await read(back, "src/index.html") == EDITED
        # The template's environment reaches commands again (a member's agent got it with its Claim).
        assert await printenv(back, "GREETING") == "hello from the template"
    finally:
        await o.close()
        await stop_all_workspaces(config)


async def printenv(session: pb.Session, name: str) -> str:
    client = AgentClient(session.agent_endpoint, session.agent_token)
    lines: list[str] = []
    try:
        assert await client.run(f"printenv {name}", on_line=lambda text, stderr: lines.append(text)) == 0
    finally:
        await client.close()
    return "\n".join(lines)


@BOTH_RUNTIMES
async def test_a_pause_is_no_exit_but_a_resumed_workspace_that_dies_fails_its_session(
    request: pytest.FixtureRequest, orchestrator: OrchestratorUnderTest, runtime_kind: str
) -> None:
    session = await create_ready(orchestrator, template="node-basic")
    await paused(orchestrator, session.id)
    await resumed(orchestrator, session.id)
    # The pause's own stop was not taken for an exit, then or since (the watch above ended READY).
    assert (await get(orchestrator, session.id)).state == READY
    [workspace] = await orchestrator.orchestrator.runtime.list()
    if runtime_kind == "docker":
        await asyncio.to_thread(request.getfixturevalue("docker_client").containers.get(workspace.handle).kill)
        reason = "the container exited with code 137 (SIGKILL)"
    else:
        os.kill(int(workspace.handle), signal.SIGKILL)
        reason = "the agent process was killed by SIGKILL"
    failed = await state_becomes(orchestrator, session.id, FAILED)
    assert failed.failure.reason == reason
