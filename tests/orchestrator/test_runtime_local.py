"""The local runtime with real agent subprocesses: start, use through AgentClient, list, adopt after a
restart, and stop (which must take the workspace's own processes down too)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import psutil
import pytest

from orchestrator.agent_client import AgentClient
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import FailedPrecondition, InitializationFailed, InvalidArgument
from orchestrator.runtime import local, make_runtime
from orchestrator.runtime.base import MANAGED_LABEL, ORCHESTRATOR_LABEL, SESSION_LABEL, Workspace
from orchestrator.runtime.local import LocalRuntime
from orchestrator.templates import ResourceHints

TOKEN = "local-test-token"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[LocalRuntime]:
    runtime = LocalRuntime(directory=tmp_path / "workspaces", instance_id="test")
    yield runtime
    for workspace in await runtime.list():
        await runtime.stop(workspace.session_id)
    await runtime.close()


async def start(runtime: LocalRuntime, session_id: str) -> tuple[Workspace, AgentClient]:
    workspace = await runtime.start(
        session_id, TOKEN, resources=ResourceHints(), env={"GREETING": "hello"}, labels={"team": "a"}
    )
    client = AgentClient(workspace.agent_endpoint, TOKEN)
    await client.wait_healthy(timeout=30)
    return workspace, client


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (killed but not yet reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


async def output_of(client: AgentClient, shell: str) -> list[str]:
    lines: list[str] = []
    assert await client.run(shell, on_line=lambda text, _: lines.append(text)) == 0
    return lines


async def test_a_started_workspace_serves_its_agent_with_env_and_port(runtime: LocalRuntime, tmp_path: Path) -> None:
    workspace, client = await start(runtime, "ws-one")
    try:
        assert workspace.runtime == "local" and workspace.running
        assert workspace.preview_url == f"http://127.0.0.1:{workspace.preview_port}/"
        assert workspace.labels == {
            "team": "a",
            MANAGED_LABEL: "true",
            ORCHESTRATOR_LABEL: "test",
            SESSION_LABEL: "ws-one",
        }
        assert await output_of(client, 'echo "$GREETING on $PORT in $PWD"') == [
            f"hello on {workspace.preview_port} in {tmp_path / 'workspaces' / 'ws-one' / 'app'}"
        ]
        # The token is required: the agent was started with it.
        intruder = AgentClient(workspace.agent_endpoint, "wrong")
        with pytest.raises(FailedPrecondition, match="UNAUTHENTICATED"):
            await intruder.activity()
        await intruder.close()
    finally:
        await client.close()


async def test_concurrent_workspaces_each_serve_their_own_agent(runtime: LocalRuntime) -> None:
    """The agent binds its port itself (port 0, reported back): no port probed free beforehand can go to
    another session's agent in between, so each endpoint is its own agent's."""
    sessions = [f"ws-many-{i}" for i in range(6)]
    workspaces = await asyncio.gather(*(start(runtime, session) for session in sessions))
    try:
        for workspace, _ in workspaces:
            port = int(workspace.agent_endpoint.rpartition(":")[2])
            listening = {
                c.laddr.port for c in psutil.Process(int(workspace.handle)).net_connections() if c.status == "LISTEN"
            }
            assert port in listening
        assert len({workspace.agent_endpoint for workspace, _ in workspaces}) == len(sessions)
    finally:
        for _, client in workspaces:
            await client.close()


async def test_an_agent_that_cannot_start_fails_the_start_with_its_reason(runtime: LocalRuntime) -> None:
    with pytest.raises(InitializationFailed, match=r"the agent exited with code \d+ before serving: .*BOGUS"):
        await runtime.start(
            "ws-broken", TOKEN, resources=ResourceHints(), env={"WORKSPACE_LOG_LEVEL": "bogus"}, labels={}
        )
    assert [workspace.session_id for workspace in await runtime.list()] == []


async def test_archives_go_in_and_come_out(runtime: LocalRuntime, tmp_path: Path) -> None:
    _workspace, client = await start(runtime, "ws-archive")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("index.js")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    archive = buffer.getvalue()

    async def chunks() -> AsyncIterator[bytes]:
        yield archive

    try:
        await client.extract_archive(chunks(), hashlib.sha256(archive).hexdigest())
        assert (tmp_path / "workspaces" / "ws-archive" / "app" / "index.js").read_bytes() == b"hello\n"
        stream = await client.create_archive()
        data = b"".join([chunk async for chunk in stream])
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            assert tar.extractfile(next(m for m in tar if m.name.endswith("index.js"))).read() == b"hello\n"
    finally:
        await client.close()


async def test_list_shows_workspaces_and_a_restarted_orchestrator_adopts_them(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    first, client = await start(runtime, "ws-adopt")
    await client.close()
    with pytest.raises(FailedPrecondition, match="already running"):
        await runtime.start("ws-adopt", TOKEN, resources=ResourceHints(), env={}, labels={})
    assert [w.session_id for w in await runtime.list()] == ["ws-adopt"]
    # Another orchestrator instance on the same data dir sees nothing of ours.
    assert await LocalRuntime(directory=tmp_path / "workspaces", instance_id="other").list() == []

    await runtime.close()
    restarted = LocalRuntime(directory=tmp_path / "workspaces", instance_id="test")
    [adopted] = await restarted.list()
    assert (adopted.session_id, adopted.handle, adopted.agent_endpoint, adopted.running) == (
        "ws-adopt", first.handle, first.agent_endpoint, True
    )  # fmt: skip

    await restarted.stop("ws-adopt")
    assert not alive(int(first.handle))
    assert await restarted.list() == []
    assert not (tmp_path / "workspaces" / "ws-adopt").exists()


@pytest.mark.parametrize("cut", ["before its pid was recorded", "before it served"])
async def test_an_agent_whose_orchestrator_died_while_starting_it_is_found_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    # The orchestrator killed while starting an agent (a pool refilling at the time): the agent runs on, and the
    # restarted orchestrator must see it to remove it (CI runs leaked such agents).
    async def never(*_: object) -> NoReturn:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    if cut == "before it served":
        monkeypatch.setattr(local, "_serving_port", never)
    else:
        spawn = LocalRuntime._spawn

        async def spawn_then_die(self: LocalRuntime, *args: Any) -> NoReturn:
            await spawn(self, *args)
            await never()

        monkeypatch.setattr(LocalRuntime, "_spawn", spawn_then_die)
    first = LocalRuntime(directory=tmp_path / "workspaces", instance_id="test")
    starting = asyncio.create_task(first.start_pooled("cut0ff", "credential"))
    async with asyncio.timeout(30):
        while not (agents := [p for p in psutil.Process().children() if "pool-cut0ff" in " ".join(p.cmdline())]):
            await asyncio.sleep(0.02)
    starting.cancel()  # the orchestrator is gone: none of its code runs on
    await asyncio.gather(starting, return_exceptions=True)
    await first.close()
    monkeypatch.undo()

    try:
        restarted = LocalRuntime(directory=tmp_path / "workspaces", instance_id="test")
        [member] = await restarted.list()
        assert (member.pool_id, member.handle, member.running) == ("cut0ff", str(agents[0].pid), True)
        await restarted.discard("cut0ff")  # what a pool's start does with an earlier orchestrator's members
        assert not alive(agents[0].pid)
        assert await restarted.list() == []
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            agents[0].kill()


async def test_a_dead_agent_is_listed_as_not_running(runtime: LocalRuntime) -> None:
    workspace, client = await start(runtime, "ws-dead")
    await client.close()
    os.kill(int(workspace.handle), 9)
    for _ in range(100):
        [listed] = await runtime.list()
        if not listed.running:
            break
        await asyncio.sleep(0.05)
    assert not listed.running


async def test_stop_ends_the_dev_server_and_what_it_started(runtime: LocalRuntime) -> None:
    workspace, client = await start(runtime, "ws-stop")
    lines: list[str] = []
    try:
        # A dev server with a helper that left its process group (as watchers and bundlers sometimes do).
        dev = await client.start_process("dev", "setsid sleep 301 & echo $!; exec sleep 300")
        following = asyncio.create_task(client.process_lines("dev", lambda text, _: lines.append(text)))
        while not lines:
            await asyncio.sleep(0.02)
        following.cancel()
    finally:
        await client.close()
    helper = int(lines[0])
    assert alive(dev) and alive(helper)

    await runtime.stop("ws-stop")

    for _ in range(100):
        if not (alive(dev) or alive(helper)):
            break
        await asyncio.sleep(0.05)
    assert not alive(int(workspace.handle))
    assert not alive(dev)
    assert not alive(helper)
    await runtime.stop("ws-stop")  # idempotent


async def test_unsafe_session_ids_are_refused(runtime: LocalRuntime) -> None:
    for session_id in ("../escape", "", "a/b", ".hidden"):
        with pytest.raises(InvalidArgument):
            await runtime.start(session_id, TOKEN, resources=ResourceHints(), env={}, labels={})


async def test_make_runtime_hands_an_extra_ca_bundle_to_the_workspace(tmp_path: Path) -> None:
    extra = tmp_path / "proxy-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Test Proxy CA",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(extra)],
        check=True, capture_output=True,
    )  # fmt: skip
    config = OrchestratorConfig(data_dir=tmp_path / "data", extra_ca_bundle=extra, instance_id="test")
    runtime = make_runtime("local", config)
    workspace = await runtime.start("ws-ca", TOKEN, resources=ResourceHints(), env={}, labels={})
    client = AgentClient(workspace.agent_endpoint, TOKEN)
    try:
        await client.wait_healthy(timeout=30)
        [pip_cert] = await output_of(client, 'echo "$PIP_CERT"')
        bundle = Path(pip_cert).read_text()
        assert bundle.endswith(extra.read_text())
        assert bundle.count("-----BEGIN CERTIFICATE-----") > 100  # the public roots stay trusted
    finally:
        await client.close()
        await runtime.stop("ws-ca")


def test_make_runtime_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate")
    with pytest.raises(InvalidArgument, match="no PEM certificate"):
        make_runtime("local", OrchestratorConfig(data_dir=tmp_path, extra_ca_bundle=not_pem))
    with pytest.raises(InvalidArgument, match="use docker, swarm or local"):
        make_runtime("podman", OrchestratorConfig(data_dir=tmp_path))


async def test_exits_report_a_killed_agent_but_not_one_stopped(runtime: LocalRuntime) -> None:
    exits = runtime.exits()
    _, first_client = await start(runtime, "ws-stopped")
    killed, second_client = await start(runtime, "ws-killed")
    await first_client.close()
    await second_client.close()
    await runtime.stop("ws-stopped")
    os.kill(int(killed.handle), 9)
    try:
        async with asyncio.timeout(60):  # bounds a hang only
            first = await anext(exits)
    finally:
        await exits.aclose()
    assert (first.session_id, first.handle) == ("ws-killed", killed.handle)
    assert first.reason == "the agent process was killed by SIGKILL"
