"""Sessions from the warm pool, through the real gRPC server: a claim gives the same READY session as a cold
start (template env, limits, a token of its own), an empty pool falls back to a cold start, a dead member is
never handed out, and an orchestrator killed mid-way leaves no workspace bound twice and no pool member behind."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from orchestrator.config import OrchestratorConfig
from orchestrator.pool import FROM_POOL, WarmPool
from orchestrator.runtime import make_runtime
from tests.conftest import REPO
from tests.live_orchestrator import free_port
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
from workspace.orchestrator.v1 import orchestrator_pb2_grpc

READY = pb.SESSION_STATE_READY
FILL_TIMEOUT_S = 90
BOTH_RUNTIMES = pytest.mark.parametrize("runtime_kind", ["local", pytest.param("docker", marks=pytest.mark.docker)])


@pytest.fixture
def pool_size() -> int:
    return 2


@pytest.fixture
async def pooled(
    orchestrator_config: OrchestratorConfig, templates: Path, pool_size: int
) -> AsyncIterator[OrchestratorUnderTest]:
    derive_template(
        templates, "env-probe",
        env={"PROBE": "from the template"},
        install_command='echo "$PROBE" > install.txt',
        dev_command='echo "$PROBE" > dev.txt; exec node server.js',
        resources={"memory_mb": 384, "cpus": 0.5, "pids": 200},
    )  # fmt: skip
    config = dataclasses.replace(orchestrator_config, warm_pool=pool_size)
    running = await start_orchestrator(config)
    try:
        assert await pool_of(running).wait_full(FILL_TIMEOUT_S)
        yield running
    finally:
        await running.close()
        await stop_all_workspaces(config)


async def create_ready(o: OrchestratorUnderTest, **source: Any) -> pb.Session:
    return await create_ready_on(o.stub, **source)


async def create_ready_on(stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub, **source: Any) -> pb.Session:
    created = await stub.CreateSession(pb.CreateSessionRequest(**source))
    session = (await watch_until_settled(stub, created.session.id))[-1].session
    assert session.state == READY, session.failure
    return session


def pool_of(o: OrchestratorUnderTest) -> WarmPool:
    pool = o.orchestrator.sessions.pool
    assert pool is not None
    return pool


def from_pool(session: pb.Session) -> bool:
    return session.phases[0].detail.endswith(FROM_POOL)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def shell_output(session: pb.Session, shell: str, token: str | None = None) -> str:
    async with aio.insecure_channel(session.agent_endpoint) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        start = agent_pb2.ExecStart(shell=shell)
        out = b""
        async for response in stub.Exec(
            iter([agent_pb2.ExecRequest(start=start)]), metadata=bearer(token or session.agent_token)
        ):
            if response.HasField("output"):
                out += response.output.data
        return out.decode()


async def refused(session: pb.Session, token: str) -> grpc.StatusCode:
    async with aio.insecure_channel(session.agent_endpoint) as channel:
        with pytest.raises(aio.AioRpcError) as error:
            await agent_pb2_grpc.AgentServiceStub(channel).GetActivity(
                agent_pb2.GetActivityRequest(), metadata=bearer(token)
            )
        return error.value.code()


@BOTH_RUNTIMES
async def test_a_session_from_the_pool_is_ready_with_its_templates_env_and_limits(
    pooled: OrchestratorUnderTest, request: pytest.FixtureRequest
) -> None:
    session = await create_ready(pooled, template="env-probe")
    assert from_pool(session), session.phases[0]
    assert (await http_get(session.preview_url))[0] == 200
    # The template's env reached the install, the dev server, and a command the backend runs afterwards.
    assert await shell_output(session, "cat install.txt dev.txt; echo $PROBE") == "from the template\n" * 3
    if pooled.config.runtime == "docker":
        container = request.getfixturevalue("docker_client").containers.get(f"workspace-core-{session.id}")
        limits = container.attrs["HostConfig"]
        assert (limits["Memory"], limits["NanoCpus"], limits["PidsLimit"]) == (384 * 1024 * 1024, 500_000_000, 200)


@BOTH_RUNTIMES
async def test_the_pool_credential_and_other_sessions_tokens_are_refused(pooled: OrchestratorUnderTest) -> None:
    credentials = {m.workspace.agent_endpoint: m.credential for m in pool_of(pooled).members}
    first, second = await asyncio.gather(
        create_ready(pooled, template="node-basic"), create_ready(pooled, template="node-basic")
    )
    assert from_pool(first) and from_pool(second)
    for mine, other in ((first, second), (second, first)):
        assert await refused(mine, credentials[mine.agent_endpoint]) == grpc.StatusCode.UNAUTHENTICATED
        assert await refused(mine, other.agent_token) == grpc.StatusCode.UNAUTHENTICATED
        assert await shell_output(mine, "echo mine") == "mine\n"


async def pools(o: OrchestratorUnderTest) -> pb.GetPoolsResponse:
    return await o.stub.GetPools(pb.GetPoolsRequest())


async def until_pools(o: OrchestratorUnderTest, wanted: pb.Pool, timeout_s: float = FILL_TIMEOUT_S) -> None:
    """Waits until GetPools reports the warm pool as `wanted`."""
    async with asyncio.timeout(timeout_s):
        while (await pools(o)).warm != wanted:
            await asyncio.sleep(0.05)


async def test_get_pools_reports_the_fill_within_max_sessions(orchestrator_config: OrchestratorConfig) -> None:
    config = dataclasses.replace(orchestrator_config, warm_pool=2, max_sessions=3)
    running = await start_orchestrator(config)
    try:
        await until_pools(running, pb.Pool(size=2, target=2, ready=2))
        assert not (await pools(running)).hot
        first = await create_ready(running, template="node-basic")
        assert from_pool(first)
        # Refilled once the session is READY, up to what --max-sessions 3 leaves beside it.
        await until_pools(running, pb.Pool(size=2, target=2, ready=2))
        second = await create_ready(running, template="node-basic")
        assert from_pool(second)
        await until_pools(running, pb.Pool(size=2, target=1, ready=1))
        await running.stub.DeleteSession(pb.DeleteSessionRequest(id=first.id))
        await until_pools(running, pb.Pool(size=2, target=2, ready=2))
    finally:
        await running.close()
        await stop_all_workspaces(config)


async def test_get_pools_lists_no_pool_when_it_is_off(orchestrator: OrchestratorUnderTest) -> None:
    response = await pools(orchestrator)
    assert not response.HasField("warm") and not response.hot


@pytest.mark.parametrize("pool_size", [1])
async def test_with_the_pool_empty_a_session_starts_cold_with_the_same_result(pooled: OrchestratorUnderTest) -> None:
    sessions = await asyncio.gather(*(create_ready(pooled, template="env-probe") for _ in range(2)))
    assert sorted(from_pool(session) for session in sessions) == [False, True]
    for session in sessions:
        assert await http_get(session.preview_url) == await http_get(sessions[0].preview_url)
        assert await shell_output(session, "cat install.txt dev.txt; echo $PROBE") == "from the template\n" * 3


@BOTH_RUNTIMES
async def test_a_member_that_died_is_never_handed_out_and_is_replaced(
    pooled: OrchestratorUnderTest, request: pytest.FixtureRequest
) -> None:
    pool = pool_of(pooled)
    dead, alive = pool.members
    if pooled.config.runtime == "docker":
        request.getfixturevalue("docker_client").containers.get(dead.workspace.handle).kill()
    else:
        os.killpg(int(dead.workspace.handle), signal.SIGKILL)
    session = await create_ready(pooled, template="node-basic")
    listed = {w.session_id: w for w in await pooled.orchestrator.runtime.list()}
    assert listed[session.id].handle == alive.workspace.handle
    assert await pool.wait_full(FILL_TIMEOUT_S)
    handles = {w.handle for w in await pooled.orchestrator.runtime.list()}
    assert dead.workspace.handle not in handles | {m.workspace.handle for m in pool.members}


async def test_a_restored_session_comes_from_the_pool_too(pooled: OrchestratorUnderTest) -> None:
    session = await create_ready(pooled, template="node-basic")
    archive = (await pooled.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id, save=True))).archive
    assert await pool_of(pooled).wait_full(FILL_TIMEOUT_S)
    restored = await create_ready(pooled, archive_id=archive.id)
    assert from_pool(restored)


# ---------------------------------------------------------------- the real process


def orchestrator_process(config: OrchestratorConfig, address: str, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [
                sys.executable, "-m", "orchestrator", "--listen", address, "--data-dir", str(config.data_dir),
                "--templates-dir", str(config.templates_dir), "--runtime", config.runtime, "--image", config.image,
                "--instance-id", config.instance_id, *args,
            ],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def pool_members(config: OrchestratorConfig) -> set[str]:
    runtime = make_runtime(config.runtime, config)
    try:
        return {w.pool_id for w in await runtime.list() if w.pool_id and w.running}
    finally:
        await runtime.close()


async def until(condition, timeout: float = FILL_TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.2)


@BOTH_RUNTIMES
async def test_an_orchestrator_killed_after_a_claim_leaves_nothing_bound_twice_or_leaked(
    orchestrator_config: OrchestratorConfig,
) -> None:
    config = orchestrator_config
    config.data_dir.mkdir(parents=True)
    log = config.data_dir / "orchestrator.log"
    address = f"127.0.0.1:{free_port()}"
    process = orchestrator_process(config, address, log, "--warm-pool", "2")
    try:
        await until(lambda: _has(pool_members(config), 2))
        old_members = await pool_members(config)
        async with aio.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            ready = await create_ready_on(stub, template="node-basic")
            # Killed while the next session's initialization runs: its member is claimed, the refill starting.
            await stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))
        process.send_signal(signal.SIGKILL)
        process.wait()

        process = orchestrator_process(config, address, log, "--warm-pool", "2")

        async def refilled() -> bool:
            # The old process's unclaimed members are gone (their credentials died with it); two new ones wait.
            members = await pool_members(config)
            return len(members) == 2 and not members & old_members

        await until(refilled)
        runtime = make_runtime(config.runtime, config)
        try:
            workspaces = await runtime.list()
        finally:
            await runtime.close()
        sessions = [w.session_id for w in workspaces if w.session_id]
        # Every workspace is a pool member or one session's; one session has one workspace.
        assert all(w.session_id or w.pool_id for w in workspaces) and len(set(sessions)) == len(sessions)
        assert ready.id in sessions, log.read_text()
        async with aio.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            states = {
                session_id: (await stub.GetSession(pb.GetSessionRequest(id=session_id))).session.state
                for session_id in sessions
            }
        # Adopted (READY before the kill), or the interrupted one, FAILED and kept as a failed session is.
        assert states.pop(ready.id) == READY
        assert set(states.values()) <= {READY, pb.SESSION_STATE_FAILED}
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        await stop_all_workspaces(config)


async def _has(members, count: int) -> bool:
    return len(await members) >= count


def test_a_pool_larger_than_max_sessions_is_refused_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--runtime", "local", "--data-dir", str(tmp_path), "--warm-pool", "3",
         "--max-sessions", "2", "--listen", f"127.0.0.1:{free_port()}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "--warm-pool 3" in result.stderr and "--max-sessions 2" in result.stderr


async def test_the_demo_waits_for_the_pool_and_says_its_session_came_from_it(
    pooled: OrchestratorUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator import demo

    stopping = asyncio.Event()
    running = asyncio.create_task(demo.run(pooled.orchestrator.sessions, "node-basic", "127.0.0.1:0", stopping))
    printed = ""
    async with asyncio.timeout(60):
        while "READY in" not in printed:
            await asyncio.sleep(0.1)
            printed += capsys.readouterr().out
    stopping.set()
    await running
    assert "demo: warm pool of 2 ready" in printed
    assert f"s {FROM_POOL}. Open http://" in printed


def _locked_template(templates: Path) -> None:
    """A template whose install only fills node_modules from a package.json and a lockfile (offline: no registry),
    skipped on an exact install-cache hit, as vite-react's is."""
    derive_template(
        templates, "locked",
        install_command="mkdir -p node_modules/dep && echo installed > node_modules/dep/index.js",
        install_on_cache_hit="skip",
    )  # fmt: skip
    (templates / "locked" / "package-lock.json").write_text('{"name": "locked", "lockfileVersion": 3}\n')


@BOTH_RUNTIMES
async def test_idle_members_hold_the_last_install_ahead_and_a_session_of_another_install_gets_none_of_it(
    orchestrator_config: OrchestratorConfig, templates: Path
) -> None:
    _locked_template(templates)
    config = dataclasses.replace(orchestrator_config, warm_pool=2)
    o = await start_orchestrator(config)
    try:
        pool = pool_of(o)
        assert await pool.wait_full(FILL_TIMEOUT_S) and all(m.prefetched is None for m in pool.members)
        first = await create_ready(o, template="locked")
        assert pb.PHASE_INSTALL in [p.phase for p in first.phases if p.outcome == pb.PHASE_OUTCOME_SUCCEEDED]
        # The install's entry is stored after READY; the idle members are then restocked with it, one at a time.
        await until(lambda: _all_prefetched(o), FILL_TIMEOUT_S)

        # A session of that install: nothing restored, nothing installed; node_modules is the entry's.
        second = await create_ready(o, template="locked")
        install = next(p for p in second.phases if p.phase == pb.PHASE_INSTALL)
        assert from_pool(second) and install.outcome == pb.PHASE_OUTCOME_SKIPPED, install
        assert "prefetched into the warm pool member" in install.detail
        assert await shell_output(second, "cat node_modules/dep/index.js; ls -A") == (
            "installed\nnode_modules\npackage-lock.json\npackage.json\nserver.js\nsrc\n"
        )

        # A session of another template on a member holding it: its tree has no node_modules, and what the
        # member held is removed from the agent's directory too.
        await until(lambda: _all_prefetched(o), FILL_TIMEOUT_S)
        other = await create_ready(o, template="node-basic")
        assert from_pool(other)
        assert await shell_output(other, "ls -A -I .workspace-agent") == "package.json\nserver.js\nsrc\n"
        leftover = "ls -d .workspace-agent/prefetched-* 2>/dev/null | wc -l"
        await until(lambda: _shell_says(other, leftover, "0\n"), 30)
    finally:
        await o.close()
        await stop_all_workspaces(config)


async def _all_prefetched(o: OrchestratorUnderTest) -> bool:
    """Whether both members hold the entry of the last install stored (the one of the `locked` template)."""
    cache = o.orchestrator.sessions._install_cache
    recent = cache.recent if cache is not None else None
    members = pool_of(o).members
    return recent is not None and len(members) == 2 and all(m.prefetched == recent for m in members)


async def _shell_says(session: pb.Session, shell: str, expected: str) -> bool:
    return await shell_output(session, shell) == expected
