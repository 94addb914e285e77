"""Sessions from a hot pool, through the real gRPC server: READY at once with the phases of a cold start, the
content hash the session was created for even if the template is edited mid-claim, stale and dead entries
never handed out, restores never from it, and entries counted within max_sessions."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import grpc
import pytest
from grpc import aio

from orchestrator.config import OrchestratorConfig
from orchestrator.runtime.base import POOL_KEY_LABEL, POOL_LABEL, POOL_TEMPLATE_LABEL
from orchestrator.sessions.hot_pool import FROM_HOT_POOL, HOT_DETAIL, KEY_CHECK_S
from tests.conftest import REPO
from tests.live_orchestrator import free_port
from tests.orchestrator.conftest import (
    OrchestratorUnderTest,
    derive_template,
    http_get,
    start_orchestrator,
    stop_all_workspaces,
)
from tests.orchestrator.test_warm_pool import FILL_TIMEOUT_S, bearer, refused, until
from workspace.agent.v1 import agent_pb2, agent_pb2_grpc
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

BOTH_RUNTIMES = pytest.mark.parametrize("runtime_kind", ["local", pytest.param("docker", marks=pytest.mark.docker)])


@pytest.fixture
def max_sessions() -> int:
    return 100


@pytest.fixture
def dev_server_reloads() -> bool:
    return True  # node-basic's own: its dev server reads src/ on each request and restarts itself on server.js


@pytest.fixture
async def hot(
    orchestrator_config: OrchestratorConfig, max_sessions: int, dev_server_reloads: bool
) -> AsyncIterator[OrchestratorUnderTest]:
    _edit_json(
        orchestrator_config.templates_dir / "node-basic" / "template.json", dev_server_reloads=dev_server_reloads
    )
    config = dataclasses.replace(orchestrator_config, hot_pool=(("node-basic", 1),), max_sessions=max_sessions)
    running = await start_orchestrator(config)
    try:
        assert await pool_of(running).wait_full(FILL_TIMEOUT_S)
        yield running
    finally:
        await running.close()
        await stop_all_workspaces(config)


async def create_ready(o: OrchestratorUnderTest, **source) -> pb.Session:
    """The session once WatchSession's stream ends (a session READY at once has its snapshot only: the session,
    then its phases)."""
    created = await o.stub.CreateSession(pb.CreateSessionRequest(**source))
    async with asyncio.timeout(60):
        async for _ in o.stub.WatchSession(pb.WatchSessionRequest(id=created.session.id)):
            pass
    session = (await o.stub.GetSession(pb.GetSessionRequest(id=created.session.id))).session
    assert session.state == pb.SESSION_STATE_READY, session.failure
    return session


def pool_of(o: OrchestratorUnderTest):
    return o.orchestrator.sessions.hot_pools["node-basic"]


def from_hot_pool(session: pb.Session) -> bool:
    return session.phases[0].detail.endswith(FROM_HOT_POOL)


def edit_page(o: OrchestratorUnderTest, text: str) -> None:
    (o.config.templates_dir / "node-basic" / "src" / "index.html").write_text(f"<h1>{text}</h1>\n")


async def page(session: pb.Session) -> str:
    return (await http_get(session.preview_url))[1]


@pytest.mark.docker
@pytest.mark.parametrize("runtime_kind", ["docker"])
async def test_a_hot_entry_runs_within_its_templates_limits_before_and_after_the_claim(
    hot: OrchestratorUnderTest, docker_client: docker.DockerClient
) -> None:
    """Its install and dev server ran within them; the claim has nothing to change."""
    node_basic = (512 * 1024 * 1024, 1_000_000_000, 256)  # templates/node-basic/template.json

    def limits(container: str) -> tuple[int, int, int]:
        host = docker_client.containers.get(container).attrs["HostConfig"]
        return host["Memory"], host["NanoCpus"], host["PidsLimit"]

    assert limits(pool_of(hot).members[0].workspace.handle) == node_basic
    session = await create_ready(hot, template="node-basic")
    assert from_hot_pool(session) and limits(f"workspace-core-{session.id}") == node_basic


@BOTH_RUNTIMES
async def test_a_session_from_the_hot_pool_is_ready_with_the_phases_of_a_cold_start(
    hot: OrchestratorUnderTest, orchestrator_config: OrchestratorConfig
) -> None:
    entry = pool_of(hot).members[0]
    assert entry.workspace.labels[POOL_LABEL] == "hot" and entry.workspace.labels[POOL_TEMPLATE_LABEL] == "node-basic"
    session = await create_ready(hot, template="node-basic")
    assert from_hot_pool(session), session.phases[0]
    assert [p.phase for p in session.phases] == [
        pb.PHASE_CONTAINER_STARTED, pb.PHASE_AGENT_HEALTHY, pb.PHASE_ARCHIVE_INJECTED,
        pb.PHASE_INSTALL, pb.PHASE_DEV_SERVER_STARTED, pb.PHASE_READY,
    ]  # fmt: skip
    assert all(p.detail == HOT_DETAIL for p in session.phases[1:])
    assert (await http_get(session.preview_url))[0] == 200
    # The dev server is the session's `dev` process, under the session's token; the pool credential is refused.
    async with aio.insecure_channel(session.agent_endpoint) as channel:
        listed = await agent_pb2_grpc.AgentServiceStub(channel).ListProcesses(
            agent_pb2.ListProcessesRequest(), metadata=bearer(session.agent_token)
        )
    assert [(p.name, p.running) for p in listed.processes] == [("dev", True)]
    assert await refused(session, entry.credential) == grpc.StatusCode.UNAUTHENTICATED
    # The pool refills with an entry of the same key.
    assert await pool_of(hot).wait_full(FILL_TIMEOUT_S)
    assert pool_of(hot).members[0].key == entry.key


@BOTH_RUNTIMES
async def test_a_template_edited_during_the_claim_leaves_the_session_on_the_content_it_was_created_for(
    hot: OrchestratorUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = pool_of(hot).members[0]
    runtime = hot.orchestrator.runtime
    claim = runtime.claim

    async def edited_then_claimed(*args, **kwargs):
        edit_page(hot, "edited during the claim")
        return await claim(*args, **kwargs)

    monkeypatch.setattr(runtime, "claim", edited_then_claimed)
    session = await create_ready(hot, template="node-basic")
    monkeypatch.undo()
    assert from_hot_pool(session)
    assert "edited during the claim" not in await page(session)
    # The refill is made from the edited template; an entry of the old content is retired, never handed out.
    await until(lambda: _has_entry_other_than(hot, before.key), FILL_TIMEOUT_S + KEY_CHECK_S)
    later = await create_ready(hot, template="node-basic")
    assert from_hot_pool(later) and "edited during the claim" in await page(later)


async def _has_entry_other_than(o: OrchestratorUnderTest, key: str) -> bool:
    members = pool_of(o).members
    return bool(members) and all(m.key != key for m in members)


async def _refreshed(o: OrchestratorUnderTest, pool_id: str, key: str) -> bool:
    """Whether the pool holds its entry `pool_id` again, under another key than `key` (brought up to an edit)."""
    return any(m.workspace.pool_id == pool_id and m.key != key for m in pool_of(o).members)


async def _handle_of(o: OrchestratorUnderTest, session: pb.Session) -> str:
    return {w.session_id: w.handle for w in await o.orchestrator.runtime.list()}[session.id]


async def _dev_process(session: pb.Session) -> agent_pb2.ProcessInfo:
    async with aio.insecure_channel(session.agent_endpoint) as channel:
        listed = await agent_pb2_grpc.AgentServiceStub(channel).ListProcesses(
            agent_pb2.ListProcessesRequest(), metadata=bearer(session.agent_token)
        )
    [dev] = [p for p in listed.processes if p.name == "dev"]
    return dev


@BOTH_RUNTIMES
async def test_an_edit_reaches_the_entry_with_its_dev_server_kept_when_the_template_says_it_reloads(
    hot: OrchestratorUnderTest,
) -> None:
    entry = pool_of(hot).members[0]
    started = await _dev_process(
        pb.Session(agent_endpoint=entry.workspace.agent_endpoint, agent_token=entry.credential)
    )
    edit_page(hot, "edited under a running dev server")
    session = await create_ready(hot, template="node-basic")  # the key check has not seen it: the create brings it in
    assert from_hot_pool(session) and await _handle_of(hot, session) == entry.workspace.handle
    assert "edited under a running dev server" in await page(session)
    kept = await _dev_process(session)
    assert kept.running and (kept.pid, kept.started_at) == (started.pid, started.started_at)


@BOTH_RUNTIMES
@pytest.mark.parametrize("dev_server_reloads", [False])
async def test_a_source_edit_brings_the_unclaimed_entry_up_to_the_new_content_in_place(
    hot: OrchestratorUnderTest,
) -> None:
    """A template whose dev server does not apply edits itself: it is restarted on the new files."""
    entry = pool_of(hot).members[0]
    before = await _dev_process(pb.Session(agent_endpoint=entry.workspace.agent_endpoint, agent_token=entry.credential))
    pool_id, key = entry.workspace.pool_id, entry.key
    edit_page(hot, "the new content")
    # server.js too, which only a restarted dev server serves: the page below proves the restart happened.
    server = hot.config.templates_dir / "node-basic" / "server.js"
    server.write_text(
        server.read_text().replace("response.end(body);", 'response.end(body + "<!-- edited server -->");')
    )
    await until(lambda: _refreshed(hot, pool_id, key), KEY_CHECK_S + 60)
    session = await create_ready(hot, template="node-basic")
    assert from_hot_pool(session) and await _handle_of(hot, session) == entry.workspace.handle
    served = await page(session)
    assert "the new content" in served and "<!-- edited server -->" in served
    assert (await _dev_process(session)).started_at != before.started_at


@BOTH_RUNTIMES
async def test_files_added_and_deleted_by_edits_are_added_and_deleted_in_the_entry(hot: OrchestratorUnderTest) -> None:
    extra = hot.config.templates_dir / "node-basic" / "src" / "extra.txt"
    handle = pool_of(hot).members[0].workspace.handle
    extra.write_text("added by an edit\n")
    session = await create_ready(hot, template="node-basic")  # the edit is not seen by the key check yet
    assert from_hot_pool(session) and await _handle_of(hot, session) == handle
    assert await http_get(session.preview_url + "extra.txt") == (200, "added by an edit\n")
    await hot.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    assert await pool_of(hot).wait_full(FILL_TIMEOUT_S)
    handle = pool_of(hot).members[0].workspace.handle
    extra.unlink()
    later = await create_ready(hot, template="node-basic")
    assert from_hot_pool(later) and await _handle_of(hot, later) == handle
    assert (await http_get(later.preview_url + "extra.txt"))[0] == 404


@BOTH_RUNTIMES
@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda folder: _edit_json(folder / "package.json", description="edited"), id="package.json"),
        pytest.param(lambda folder: _edit_json(folder / "template.json", env={"EDITED": "1"}), id="env"),
        pytest.param(lambda folder: _edit_json(folder / "template.json", resources={"memory_mb": 384}), id="limits"),
    ],
)
async def test_an_edit_of_the_install_inputs_retires_the_entry_and_refills(hot: OrchestratorUnderTest, edit) -> None:
    stale = pool_of(hot).members[0]
    edit(hot.config.templates_dir / "node-basic")
    await until(lambda: _has_entry_other_than(hot, stale.key), FILL_TIMEOUT_S + KEY_CHECK_S)
    assert stale.workspace.pool_id not in {w.pool_id for w in await hot.orchestrator.runtime.list()}
    session = await create_ready(hot, template="node-basic")
    assert from_hot_pool(session) and await _handle_of(hot, session) != stale.workspace.handle


def _edit_json(path: Path, **fields) -> None:
    document = json.loads(path.read_text())
    document.update(fields)
    path.write_text(json.dumps(document))


async def test_an_edit_not_yet_seen_by_the_pool_is_never_served_from_a_stale_entry(hot: OrchestratorUnderTest) -> None:
    edit_page(hot, "edited just now")
    session = await create_ready(hot, template="node-basic")
    # The key is computed at CreateSession: the entry is brought up to the edit before it is handed out.
    assert from_hot_pool(session) and "edited just now" in await page(session)


@BOTH_RUNTIMES
async def test_a_dead_entry_is_never_handed_out(hot: OrchestratorUnderTest, request: pytest.FixtureRequest) -> None:
    dead = pool_of(hot).members[0]
    if hot.config.runtime == "docker":
        request.getfixturevalue("docker_client").containers.get(dead.workspace.handle).kill()
    else:
        os.killpg(int(dead.workspace.handle), signal.SIGKILL)
    session = await create_ready(hot, template="node-basic")
    assert not from_hot_pool(session)
    listed = {w.session_id: w.handle for w in await hot.orchestrator.runtime.list()}
    assert listed[session.id] != dead.workspace.handle


@BOTH_RUNTIMES
async def test_a_dev_server_that_died_in_an_entry_is_never_handed_out(hot: OrchestratorUnderTest) -> None:
    entry = pool_of(hot).members[0]
    await entry.agent.stop_process("dev")
    session = await create_ready(hot, template="node-basic")
    assert not from_hot_pool(session)


@BOTH_RUNTIMES
async def test_a_restore_never_takes_a_hot_entry(hot: OrchestratorUnderTest) -> None:
    session = await create_ready(hot, template="node-basic")
    archive = (await hot.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id, save=True))).archive
    assert await pool_of(hot).wait_full(FILL_TIMEOUT_S)
    restored = await create_ready(hot, archive_id=archive.id)
    assert not from_hot_pool(restored)
    assert len(pool_of(hot).members) == 1


@BOTH_RUNTIMES
@pytest.mark.parametrize("max_sessions", [1])
async def test_hot_entries_count_within_max_sessions(hot: OrchestratorUnderTest) -> None:
    session = await create_ready(hot, template="node-basic")
    assert from_hot_pool(session)
    # The one slot is the session's: no refill, and a second session is refused.
    assert pool_of(hot).held == 0
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await hot.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await hot.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    assert await pool_of(hot).wait_full(FILL_TIMEOUT_S)


async def test_get_pools_reports_each_hot_pool_by_template(hot: OrchestratorUnderTest) -> None:
    response = await hot.stub.GetPools(pb.GetPoolsRequest())
    assert list(response.hot) == [pb.Pool(template="node-basic", size=1, target=1, ready=1)]
    assert not response.HasField("warm")
    session = await create_ready(hot, template="node-basic")
    assert from_hot_pool(session)
    async with asyncio.timeout(FILL_TIMEOUT_S):  # taken, then prepared again (injected, installed, dev server up)
        while (await hot.stub.GetPools(pb.GetPoolsRequest())).hot[0].ready != 1:
            await asyncio.sleep(0.05)


def test_the_key_label_names_the_content_hash_and_the_image() -> None:
    from orchestrator.sessions.hot_pool import entry_key
    from orchestrator.templates import PinnedTemplate

    pinned = PinnedTemplate(spec=None, archive=None, content_hash="ab" * 32)  # type: ignore[arg-type]
    assert entry_key(pinned, "sha256:" + "cd" * 32) == f"{'ab' * 8}:{'cd' * 6}"
    assert POOL_KEY_LABEL == "workspace-core.pool.key"


@pytest.mark.parametrize("runtime_kind", [pytest.param("docker", marks=pytest.mark.docker)])
async def test_a_rebuilt_image_retires_the_entries_made_on_the_old_one(
    orchestrator_config: OrchestratorConfig, request: pytest.FixtureRequest
) -> None:
    client = request.getfixturevalue("docker_client")
    # A tag of this test's own, moved to a new image as a rebuild moves the orchestrator's.
    repository, tag = "workspace-core-hotpool-test", orchestrator_config.instance_id
    client.images.get(orchestrator_config.image).tag(repository, tag)
    config = dataclasses.replace(orchestrator_config, image=f"{repository}:{tag}", hot_pool=(("node-basic", 1),))
    running = await start_orchestrator(config)
    rebuilt = None
    try:
        assert await pool_of(running).wait_full(FILL_TIMEOUT_S)
        old = pool_of(running).members[0]
        dockerfile = io.BytesIO(f"FROM {orchestrator_config.image}\nLABEL rebuilt={tag}\n".encode())
        rebuilt, _ = await asyncio.to_thread(
            client.images.build, fileobj=dockerfile, tag=f"{repository}:{tag}", rm=True
        )
        assert old.key.split(":")[1] != rebuilt.id.removeprefix("sha256:")[:12]
        await until(lambda: _has_entry_other_than(running, old.key), FILL_TIMEOUT_S + KEY_CHECK_S)
        assert pool_of(running).members[0].key.split(":")[1] == rebuilt.id.removeprefix("sha256:")[:12]
        session = await create_ready(running, template="node-basic")
        assert from_hot_pool(session)
        container = client.containers.get(f"workspace-core-{session.id}")
        assert container.image.id == rebuilt.id
    finally:
        await running.close()
        await stop_all_workspaces(config)
        client.images.remove(f"{repository}:{tag}")  # the rebuilt image goes with its only tag
        if rebuilt is not None:
            with contextlib.suppress(docker.errors.NotFound):
                client.images.remove(rebuilt.id)


async def test_a_templates_own_hot_pool_is_kept_unless_the_flag_turns_it_off(
    orchestrator_config: OrchestratorConfig, templates: Path
) -> None:
    derive_template(templates, "kept-hot", hot_pool=1)
    derive_template(templates, "turned-off", hot_pool=1)
    config = dataclasses.replace(orchestrator_config, hot_pool=(("turned-off", 0),))
    running = await start_orchestrator(config)
    try:
        assert set(running.orchestrator.sessions.hot_pools) == {"kept-hot"}
        assert await running.orchestrator.sessions.hot_pools["kept-hot"].wait_full(FILL_TIMEOUT_S)
        session = await create_ready(running, template="kept-hot")
        assert from_hot_pool(session)
    finally:
        await running.close()
        await stop_all_workspaces(config)


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--hot-pool", "no-such-template=1"], "--hot-pool no-such-template: no template 'no-such-template'"),
        (["--hot-pool", "node-basic=2", "--max-sessions", "2"], "--max-sessions 2"),
        (["--hot-pool", "node-basic"], "is not TEMPLATE=K"),
    ],
)
def test_a_hot_pool_that_cannot_be_kept_is_refused_at_start(tmp_path: Path, flags: list[str], said: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--runtime", "local", "--data-dir", str(tmp_path),
         "--listen", f"127.0.0.1:{free_port()}", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert said in result.stderr, result.stderr
