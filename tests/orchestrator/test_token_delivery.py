"""The agent's token reaches the agent and nothing else: not the environment of commands or named processes,
not /proc of the agent, init or any other process, not the file it was handed over in. Against a real
container (Docker) and real agent subprocesses (local)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest

from common.constants import TOKEN_ENV
from orchestrator.agent_client import AgentClient
from orchestrator.errors import FailedPrecondition
from orchestrator.runtime.docker import TOKEN_PATH, DockerRuntime
from orchestrator.runtime.local import TOKEN_FILE, LocalRuntime
from orchestrator.templates import ResourceHints

HINTS = ResourceHints(memory_mb=512, cpus=0.5, pids=200)
# What a process of the workspace user can see: every /proc/<pid>/environ and cmdline it may read (the
# refused ones listed), and the token file if it is still there. Printed as JSON for the test to search.
SWEEP = r"""
import json, os, pathlib
seen, refused = {}, []
for proc in pathlib.Path("/proc").glob("[0-9]*"):
    for name in ("environ", "cmdline"):
        try:
            seen[f"{proc}/{name}"] = (proc / name).read_bytes().decode(errors="replace")
        except PermissionError:
            refused.append(f"{proc}/{name}")
        except OSError:
            pass
try:
    seen[os.environ["TOKEN_PATH"]] = pathlib.Path(os.environ["TOKEN_PATH"]).read_text()
except OSError as error:
    seen[os.environ["TOKEN_PATH"]] = error.strerror
agent = [path[: -len("/cmdline")] for path, text in seen.items() if text.split("\0")[1:3] == ["-m", "agent"]]
print(json.dumps({"seen": seen, "refused": refused, "agent": agent}))
"""


async def lines_of(client: AgentClient, shell: str, env: dict[str, str] | None = None) -> str:
    lines: list[str] = []
    assert await client.run(shell, env=env, on_line=lambda text, _: lines.append(text)) == 0, lines
    return "\n".join(lines)


async def named_process_output(client: AgentClient, shell: str) -> str:
    lines: list[str] = []
    await client.start_process("probe", shell)
    assert await client.process_lines("probe", lambda text, _: lines.append(text)) == 0, lines
    return "\n".join(lines)


async def assert_the_token_is_refused_when_wrong(endpoint: str) -> None:
    intruder = AgentClient(endpoint, "wrong")
    try:
        with pytest.raises(FailedPrecondition, match="UNAUTHENTICATED"):
            await intruder.activity()
    finally:
        await intruder.close()


# ---------------------------------------------------------------- Docker


@pytest.mark.docker
async def test_no_process_in_the_container_can_read_the_token(
    docker_runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    token = secrets.token_urlsafe(24)
    workspace = await docker_runtime.start("ws-token", token, resources=HINTS, env={}, labels={})
    container = docker_client.containers.get(workspace.handle)
    client = AgentClient(workspace.agent_endpoint, token)
    try:
        await client.wait_healthy(timeout=60)
        await assert_the_token_is_refused_when_wrong(workspace.agent_endpoint)  # the agent has it, and needs it

        assert token not in json.dumps(container.attrs["Config"])  # not in the container's env or command
        environment = await lines_of(client, "env")
        assert "PORT=4321" in environment and token not in environment and TOKEN_ENV not in environment
        named = await named_process_output(client, "env; cat /proc/self/environ")
        assert "PORT=4321" in named and token not in named and TOKEN_ENV not in named

        # The same sweep as a command of the agent and as a `docker exec` (both the workspace user).
        from_exec = json.loads(await lines_of(client, f"python3 -c '{SWEEP}'", env={"TOKEN_PATH": TOKEN_PATH}))
        result = container.exec_run(["python3", "-c", SWEEP], environment={"TOKEN_PATH": TOKEN_PATH})
        from_docker_exec = json.loads(result.output)
        for sweep in (from_exec, from_docker_exec):
            assert token not in json.dumps(sweep["seen"])
            assert sweep["seen"][TOKEN_PATH] == "No such file or directory"
            # The sweep does read what it may: tini's environment (the container's) is there, the agent's is not.
            assert "PORT=4321" in sweep["seen"]["/proc/1/environ"]
            [agent] = sweep["agent"]
            assert f"{agent}/environ" in sweep["refused"]
            assert "--token-file" in sweep["seen"][f"{agent}/cmdline"]
        code, output = container.exec_run(["cat", f"{from_exec['agent'][0]}/environ"])
        assert code != 0 and b"Permission denied" in output, output
    finally:
        await client.close()


# ---------------------------------------------------------------- local


@pytest.fixture
async def local_runtime(tmp_path: Path) -> AsyncIterator[LocalRuntime]:
    runtime = LocalRuntime(directory=tmp_path / "workspaces", instance_id="test")
    yield runtime
    for workspace in await runtime.list():
        await runtime.stop(workspace.session_id)
    await runtime.close()


async def test_a_local_agent_takes_its_token_from_a_file_it_removes(
    local_runtime: LocalRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An orchestrator that itself runs with the variable set does not pass it on.
    monkeypatch.setenv(TOKEN_ENV, "the-orchestrators-own")
    token = secrets.token_urlsafe(24)
    workspace = await local_runtime.start("ws-token", token, resources=HINTS, env={}, labels={})
    client = AgentClient(workspace.agent_endpoint, token)
    try:
        await client.wait_healthy(timeout=30)
        await assert_the_token_is_refused_when_wrong(workspace.agent_endpoint)

        assert not (tmp_path / "workspaces" / "ws-token" / TOKEN_FILE).exists()
        agent = Path(f"/proc/{workspace.handle}")
        assert token.encode() not in agent.joinpath("environ").read_bytes() + agent.joinpath("cmdline").read_bytes()
        for output in (await lines_of(client, "env"), await named_process_output(client, "env")):
            assert "PORT=" in output and token not in output and TOKEN_ENV not in output
    finally:
        await client.close()
