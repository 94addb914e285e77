"""Docker in the tests: the engine (in CI a missing one fails the run, elsewhere it skips with the
reason), the core image, and the agent in a hardened workspace-core container."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from docker.models.containers import Container
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import constants
from core_image.build import ensure_image
from orchestrator.runtime.docker import TOKEN_PATH, deliver_token

IN_CI = os.environ.get("CI") == "true"
WORKSPACE_UID = 1000  # the image's workspace user, owner of /app
AGENT_PORT = f"{constants.AGENT_PORT}/tcp"
TEST_LABEL = "workspace-core.test"
# The hardening the orchestrator applies, with limits sized for the contract tests.
HARDENING = {
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
    "pids_limit": 256,
    "mem_limit": "1g",
}


def engine_or_skip() -> docker.DockerClient:
    """A client of a reachable engine; without one, fails the test in CI (tests marked `docker` must run
    there) and skips it elsewhere."""
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except docker.errors.DockerException as error:
        reason = f"no Docker engine ({error}); `make test` or core_image/ensure_docker.sh starts one"
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return client


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = engine_or_skip()
    yield client
    client.close()


@pytest.fixture(scope="session")
def core_image(docker_client: docker.DockerClient) -> str:
    """The pinned tag of the core image for the current sources (built here if `make image` did not)."""
    return ensure_image(docker_client)


# The token each agent container was given (it is nowhere in the container once its agent has started).
_tokens: dict[str, str] = {}


def run_agent_container(client: docker.DockerClient, image: str, root: Path, *agent_args: str, **options) -> Container:
    """Starts the image's agent on `root` (mounted as /app), published on 127.0.0.1 only, hardened, with a
    random token handed over as the orchestrator does (a file the agent removes); `options` add to or override
    the container's settings."""
    hand_over_to_workspace_user(root)
    uid, gid = (WORKSPACE_UID, WORKSPACE_UID) if os.geteuid() in (0, WORKSPACE_UID) else (os.geteuid(), os.getegid())
    # Another user than the image's cannot enter the image's token directory: its token goes to /tmp.
    token_path = TOKEN_PATH if uid == WORKSPACE_UID else "/tmp/agent-token"
    container = client.containers.create(
        image,
        ["--token-file", token_path, *agent_args],
        user=f"{uid}:{gid}",
        ports={AGENT_PORT: ("127.0.0.1", None)},
        volumes={str(root): {"bind": "/app", "mode": "rw"}},
        labels={TEST_LABEL: "agent"},
        **{**HARDENING, **options},
    )
    try:
        _tokens[container.id] = secrets.token_urlsafe(16)
        deliver_token(container, _tokens[container.id], path=token_path, uid=uid)
        container.start()
    except BaseException:
        container.remove(force=True)
        raise
    return container


def agent_token(container: Container) -> str:
    return _tokens[container.id]


async def wait_for_agent(container: Container, timeout: float = 20.0) -> str:
    """The agent's published address once its health service answers SERVING. Raises AssertionError
    with the container's log when it exits or does not answer in time."""
    container.reload()
    address = f"127.0.0.1:{container.ports[AGENT_PORT][0]['HostPort']}"
    # Short reconnect backoff: until the agent listens, the engine's proxy accepts and drops connections.
    options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]
    deadline = time.monotonic() + timeout
    async with aio.insecure_channel(address, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return address
            except aio.AioRpcError:
                container.reload()
                if container.status != "running":
                    break
            await asyncio.sleep(0.05)
    container.reload()
    logs = container.logs().decode(errors="replace")[-3000:]
    raise AssertionError(f"agent container {container.short_id} is {container.status}, not serving:\n{logs}")


def hand_over_to_workspace_user(root: Path) -> None:
    """Gives what a root test process wrote under `root` to the workspace user, as everything in a real
    workspace belongs to it (it arrives through the agent). Links are changed, never followed."""
    if os.geteuid() != 0:
        return
    os.chown(root, WORKSPACE_UID, WORKSPACE_UID)
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            if os.lstat(path).st_uid != WORKSPACE_UID:
                os.chown(path, WORKSPACE_UID, WORKSPACE_UID, follow_symlinks=False)


class _HandOver:
    def __init__(self, root: Path) -> None:
        self.root = root


class _HandOverUnaryUnary(_HandOver, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        hand_over_to_workspace_user(self.root)
        return await continuation(client_call_details, request)


class _HandOverUnaryStream(_HandOver, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        hand_over_to_workspace_user(self.root)
        return await continuation(client_call_details, request)


class _HandOverStreamUnary(_HandOver, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        hand_over_to_workspace_user(self.root)
        return await continuation(client_call_details, request_iterator)


class _HandOverStreamStream(_HandOver, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        hand_over_to_workspace_user(self.root)
        return await continuation(client_call_details, request_iterator)


def hand_over_before_each_call(root: Path) -> list[aio.ClientInterceptor]:
    """Channel interceptors that run hand_over_to_workspace_user before every call, so a test can write
    files on the host and then have the containerised agent change them, as with the in-process agent.
    (One per kind of call: a grpc.aio channel files each interceptor under one kind only.)"""
    return [
        cls(root) for cls in (_HandOverUnaryUnary, _HandOverUnaryStream, _HandOverStreamUnary, _HandOverStreamStream)
    ]
