"""Orchestrator fixtures: a real orchestrator gRPC server on port 0 with the local runtime (agents as
subprocesses), over copies of the repo's templates plus a few broken on purpose."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc import aio

from orchestrator.config import OrchestratorConfig
from orchestrator.runtime.docker import DockerRuntime
from orchestrator.server import Orchestrator, create_server
from tests.conftest import REPO
from tests.s3_server import s3, s3_server  # noqa: F401 - fixtures: a real S3 server and a bucket per test
from workspace.orchestrator.v1 import orchestrator_pb2 as pb
from workspace.orchestrator.v1 import orchestrator_pb2_grpc

# The preview is on loopback: never through an HTTP(S)_PROXY from the environment.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SETTLED = {pb.SESSION_STATE_READY, pb.SESSION_STATE_FAILED, pb.SESSION_STATE_STOPPED}


def derive_template(templates: Path, name: str, **fields) -> None:
    """A copy of node-basic named `name` with `fields` of its template.json replaced."""
    folder = templates / name
    shutil.copytree(templates / "node-basic", folder)
    metadata = json.loads((folder / "template.json").read_text())
    metadata.update(name=name, **fields)
    (folder / "template.json").write_text(json.dumps(metadata))


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    directory = tmp_path / "templates"
    shutil.copytree(REPO / "templates" / "node-basic", directory / "node-basic")
    derive_template(
        directory,
        "failing-install",
        install_command="echo resolving packages; echo 'npm ERR! 404 no-such-package' >&2; exit 3",
    )
    derive_template(directory, "dying-dev", dev_command="echo starting; echo 'Error: port in use' >&2; exit 1")
    derive_template(directory, "invalid", dev_port="not a port")
    return directory


@dataclass
class OrchestratorUnderTest:
    orchestrator: Orchestrator
    config: OrchestratorConfig
    channel: aio.Channel
    stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub

    async def close(self) -> None:
        """Stops serving; the sessions keep running, as after a SIGTERM."""
        await self.channel.close()
        await self.orchestrator.stop(None)


async def start_orchestrator(config: OrchestratorConfig) -> OrchestratorUnderTest:
    orchestrator = await create_server(config)
    await orchestrator.start()
    channel = aio.insecure_channel(f"127.0.0.1:{orchestrator.port}")
    return OrchestratorUnderTest(orchestrator, config, channel, orchestrator_pb2_grpc.OrchestratorServiceStub(channel))


@pytest.fixture
def runtime_kind() -> str:
    """The runtime under test; tests that also run on Docker parametrize this with a `docker`-marked param."""
    return "local"


@pytest.fixture
def orchestrator_config(
    request: pytest.FixtureRequest, tmp_path: Path, templates: Path, runtime_kind: str
) -> OrchestratorConfig:
    return OrchestratorConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        templates_dir=templates,
        runtime=runtime_kind,
        image=request.getfixturevalue("core_image") if runtime_kind == "docker" else OrchestratorConfig.image,
        # Its own label value: cleanup removes this test's containers and nobody else's.
        instance_id=f"test-{secrets.token_hex(4)}",
        reap_interval_s=3600,  # tests sweep by hand
    )


@pytest.fixture
async def orchestrator(orchestrator_config: OrchestratorConfig) -> AsyncIterator[OrchestratorUnderTest]:
    running = await start_orchestrator(orchestrator_config)
    try:
        yield running
    finally:
        await running.close()
        await stop_all_workspaces(orchestrator_config)


async def stop_all_workspaces(config: OrchestratorConfig) -> None:
    """Removes every workspace a test left running (agents are subprocesses that outlive the server)."""
    from orchestrator.runtime import make_runtime
    from orchestrator.runtime.docker import DockerRuntime

    runtime = make_runtime(config.runtime, config)
    for workspace in await runtime.list():
        if workspace.pool_id:
            await runtime.discard(workspace.pool_id)
        else:
            await runtime.stop(workspace.session_id)
    if isinstance(runtime, DockerRuntime):
        await runtime.remove_network()
    await runtime.close()


async def watch_until_settled(
    stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub, session_id: str, timeout: float = 60
) -> list[pb.WatchSessionResponse]:
    """Every event of WatchSession until the stream ends (it ends once the session settles)."""
    events = []
    async with asyncio.timeout(timeout):
        async for event in stub.WatchSession(pb.WatchSessionRequest(id=session_id)):
            events.append(event)
    assert events[-1].session.state in SETTLED, events[-1]
    return events


@pytest.fixture
async def docker_runtime(core_image: str) -> AsyncIterator[DockerRuntime]:
    """A Docker runtime of an instance of its own; what it started (pool members too) and its network are
    removed afterwards."""
    runtime = DockerRuntime(image=core_image, instance_id=f"test-{secrets.token_hex(4)}")
    yield runtime
    for workspace in await runtime.list():
        if workspace.pool_id:
            await runtime.discard(workspace.pool_id)
        else:
            await runtime.stop(workspace.session_id)
    await runtime.remove_network()
    await runtime.close()


async def http_get(url: str) -> tuple[int, str]:
    """Status and body of GET url (errors as their status; connection failures raise OSError)."""

    def get() -> tuple[int, str]:
        try:
            with NO_PROXY.open(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    return await asyncio.to_thread(get)


async def page_showing(url: str, text: str, timeout_s: float = 30.0) -> tuple[int, str]:
    """Status and body of the first answer from `url` whose body holds `text`. A dev server that watches its
    files restarts after an edit: until it listens again, connections fail and are retried. The timeout
    bounds a hang only; once it passes, the last answer (or connection error) is returned (or raised)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            status, body = await http_get(url)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
        else:
            if text in body or asyncio.get_running_loop().time() > deadline:
                return status, body
        await asyncio.sleep(0.1)
