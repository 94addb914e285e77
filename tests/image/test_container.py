"""The core image in a hardened container: who the agent runs as, what it may write, the pids limit,
the HEALTHCHECK, and the tools every workspace needs."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest
from docker.models.containers import Container
from docker.types import Healthcheck
from grpc import aio

from common.constants import MiB
from core_image.build import NODE_VERSION
from tests.docker_support import agent_token, hand_over_to_workspace_user, run_agent_container, wait_for_agent
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc

pytestmark = pytest.mark.docker
# The agent's own process as the kernel sees it (not tini, not a docker exec).
AGENT_STATUS = """
import json, pathlib
for proc in pathlib.Path("/proc").glob("[0-9]*"):
    if (proc / "cmdline").read_bytes().split(b"\\0")[1:3] == [b"-m", b"agent"]:
        print(json.dumps(dict(line.split(":\\t", 1) for line in (proc / "status").read_text().splitlines())))
"""
# Forks sleepers until the kernel refuses, at most 1000; prints how many it got and the refusal.
FORK_UNTIL_REFUSED = """
import os, time
for count in range(1000):
    try:
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
    except OSError as refusal:
        print(count, refusal.strerror)
        break
"""


def run_in(container: Container, *command: str) -> tuple[int, str]:
    """Runs `command` in the container as the image's user; its exit code and output."""
    result = container.exec_run(list(command))
    return result.exit_code, result.output.decode(errors="replace")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
async def container(docker_client: docker.DockerClient, core_image: str, workspace: Path) -> AsyncIterator[Container]:
    """One hardened agent container for the checks that only look."""
    container = run_agent_container(docker_client, core_image, workspace)
    try:
        await wait_for_agent(container)
        yield container
    finally:
        container.remove(force=True)


async def answers_with_token(container: Container) -> pb.GetActivityResponse:
    """Asks the agent for its activity over the published port, as a client with the token does."""
    async with aio.insecure_channel(await wait_for_agent(container)) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        metadata = (("authorization", f"Bearer {agent_token(container)}"),)
        return await stub.GetActivity(pb.GetActivityRequest(), metadata=metadata, timeout=5)


def test_image_stays_small(docker_client: docker.DockerClient, core_image: str) -> None:
    assert docker_client.images.get(core_image).attrs["Size"] < 500 * MiB


def test_agent_is_published_on_loopback_only(container: Container) -> None:
    assert {binding["HostIp"] for binding in container.ports["3001/tcp"]} == {"127.0.0.1"}


async def test_agent_runs_unprivileged_and_still_serves(container: Container) -> None:
    code, output = run_in(container, "/tools/venv/bin/python", "-c", AGENT_STATUS)
    assert code == 0, output
    status = json.loads(output)
    assert status["Uid"].split() == ["1000"] * 4
    assert status["Gid"].split() == ["1000"] * 4
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert (await answers_with_token(container)).started_at.seconds > 0


@pytest.mark.parametrize("path", ["/tools/x", "/tools/lib/agent/x", "/tools/venv/bin/x", "/tools/healthcheck.py"])
def test_tools_are_read_only_to_the_workspace_user(container: Container, path: str) -> None:
    code, output = run_in(container, "sh", "-c", f"echo changed >> {path}")
    assert code != 0 and "Permission denied" in output, output


def test_app_belongs_to_the_workspace_user(container: Container, workspace: Path) -> None:
    code, output = run_in(container, "sh", "-c", "echo written > /app/by-the-user && id -u")
    assert (code, output.strip()) == (0, "1000")
    assert (workspace / "by-the-user").read_text() == "written\n"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["node", "--version"], f"v{NODE_VERSION}"),
        # Built with V8's startup snapshot and code cache (Debian's nodejs is not): each node process a session
        # starts (npm, the dev server, node --watch's child) starts 3-4x faster with them.
        (
            [
                "node",
                "-p",
                "process.config.variables.node_use_node_snapshot && process.config.variables.node_use_node_code_cache",
            ],
            "true",
        ),
        (["npm", "--version"], "10."),
        (["npx", "--version"], "10."),
        (["git", "--version"], "git version "),
        (["rg", "--version"], "ripgrep "),
        (["python3", "--version"], "Python 3."),
        # No "new version of npm available" notice in every install's output.
        (["npm", "config", "get", "update-notifier"], "false"),
    ],
)
def test_workspace_tools_work(container: Container, command: list[str], expected: str) -> None:
    code, output = run_in(container, *command)
    assert code == 0 and output.startswith(expected), output


def test_npm_runs_a_package_script(container: Container, workspace: Path) -> None:
    # npm's own code (not only --version) works for the unprivileged user, as `npm install` will.
    (workspace / "probe").mkdir()
    scripts = {"hello": "node -p process.version"}
    (workspace / "probe" / "package.json").write_text(
        json.dumps({"name": "probe", "version": "1.0.0", "scripts": scripts})
    )
    hand_over_to_workspace_user(workspace)
    code, output = run_in(container, "sh", "-c", "cd /app/probe && npm run --silent hello")
    assert code == 0 and output.strip() == f"v{NODE_VERSION}", output


async def test_pids_limit_stops_a_fork_bomb_and_the_agent_still_answers(
    docker_client: docker.DockerClient, core_image: str, tmp_path: Path
) -> None:
    container = run_agent_container(docker_client, core_image, tmp_path, pids_limit=64)
    try:
        await wait_for_agent(container)
        code, output = run_in(container, "/tools/venv/bin/python", "-c", FORK_UNTIL_REFUSED)
        forked, refusal = output.strip().split(" ", 1)
        assert code == 0 and refusal == "Resource temporarily unavailable", output
        assert int(forked) < 64
        assert (await answers_with_token(container)).started_at.seconds > 0
    finally:
        container.remove(force=True)


def wait_for_health(container: Container, wanted: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        health = container.attrs["State"]["Health"]
        if health["Status"] == wanted:
            return health
        time.sleep(0.2)
    raise AssertionError(f"health is {health['Status']}, not {wanted}: {health['Log'][-3:]}")


# The image's own check command; only its timing is shortened so the test need not wait 30 s.
# (A start period of 0 would mean the image's 10 s; 1 ms is the least the engine takes.)
FAST_CHECKS = Healthcheck(interval=500_000_000, timeout=5_000_000_000, retries=2, start_period=1_000_000)


def test_healthcheck_reports_healthy(docker_client: docker.DockerClient, core_image: str, tmp_path: Path) -> None:
    container = run_agent_container(docker_client, core_image, tmp_path, healthcheck=FAST_CHECKS)
    try:
        assert "/tools/healthcheck.py" in container.attrs["Config"]["Healthcheck"]["Test"]
        assert wait_for_health(container, "healthy")["Log"][-1]["ExitCode"] == 0
    finally:
        container.remove(force=True)


def test_healthcheck_reports_an_agent_that_does_not_serve(
    docker_client: docker.DockerClient, core_image: str, tmp_path: Path
) -> None:
    # The agent listens elsewhere than the port the check (and the orchestrator) expects.
    container = run_agent_container(
        docker_client, core_image, tmp_path, "--listen", "0.0.0.0:3999", healthcheck=FAST_CHECKS
    )
    try:
        log = wait_for_health(container, "unhealthy")["Log"]
        assert "UNAVAILABLE" in log[-1]["Output"]
    finally:
        container.remove(force=True)
