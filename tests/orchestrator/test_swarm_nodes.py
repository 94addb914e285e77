"""Opt-in (WORKSPACE_TEST_SWARM_NODES=1): a three-node swarm of Docker-in-Docker nodes on a bridge network of the
test's own. Sessions spread over the nodes; a killed worker's sessions are reported and come back from their last
save on another node. Prints its figures (run with -s to see them)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from docker.types import Mount

from core_image.build import BOOTSTRAPPED_BASE
from orchestrator.config import OrchestratorConfig
from orchestrator.runtime.base import SESSION_LABEL
from tests.conftest import REPO
from tests.orchestrator.conftest import OrchestratorUnderTest, start_orchestrator
from tests.orchestrator.test_warm_pool import create_ready, shell_output
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        os.environ.get("WORKSPACE_TEST_SWARM_NODES") != "1", reason="opt-in: WORKSPACE_TEST_SWARM_NODES=1"
    ),
]

NODE_CONTEXT = REPO / "tests" / "swarm_node"
NODES = 3
TEST_LABEL = "workspace-core.test.swarm-nodes"
READY = pb.SESSION_STATE_READY


@dataclass
class Swarm:
    manager: docker.DockerClient
    manager_socket: Path
    containers: list  # the node containers, manager first
    addresses: list[str]


def node_image(client: docker.DockerClient) -> str:
    """The node image for the current tests/swarm_node/Dockerfile (built here the first time)."""
    digest = hashlib.sha256((NODE_CONTEXT / "Dockerfile").read_bytes()).hexdigest()[:16]
    tag = f"workspace-core-swarm-node:{digest}"
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        base = BOOTSTRAPPED_BASE
        try:
            client.images.get(base)
        except docker.errors.ImageNotFound:
            base = "debian:trixie-slim"
        client.images.build(path=str(NODE_CONTEXT), tag=tag, buildargs={"BASE_IMAGE": base}, rm=True)
    return tag


def host_resolver() -> str:
    """The host's name server: inner engines would give their containers 8.8.8.8 otherwise."""
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        if line.startswith("nameserver "):
            return line.split()[1]
    return "127.0.0.11"


@pytest.fixture(scope="module")
def three_nodes(
    docker_client: docker.DockerClient, core_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Swarm]:
    run = secrets.token_hex(4)
    labels = {TEST_LABEL: run}
    image = node_image(docker_client)
    network = docker_client.networks.create(f"wsc-swarm-nodes-{run}", driver="bridge", labels=labels)
    sockets = tmp_path_factory.mktemp("node-sockets")
    containers = []
    try:
        for index in range(NODES):
            (sockets / f"node{index}").mkdir()
            # `--privileged` is refused here (CAP_SYS_RESOURCE is not in the bounding set): everything else is given.
            api = docker_client.api
            host_config = api.create_host_config(
                cap_add=["ALL"], cap_drop=["SYS_RESOURCE"], security_opt=["seccomp=unconfined"],
                device_cgroup_rules=["a *:* rwm"],
                binds={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
                       str(sockets / f"node{index}"): {"bind": "/run/node", "mode": "rw"}},
                mounts=[Mount("/var/lib/docker", None)],  # an anonymous volume: overlayfs on overlayfs does not work
                network_mode=network.name,
            )  # fmt: skip
            # `--security-opt systempaths=unconfined`, which docker-py has no argument for: nothing masked in /proc.
            host_config.update(MaskedPaths=[], ReadonlyPaths=[])
            created = api.create_container(
                image, ["-H", "unix:///run/node/docker.sock", "--dns", host_resolver(), "--no-new-privileges"],
                name=f"wsc-swarm-node{index}-{run}", hostname=f"node{index}", labels=labels, host_config=host_config,
            )  # fmt: skip
            container = docker_client.containers.get(created["Id"])
            containers.append(container)
            container.start()
        clients, addresses = [], []
        for index, container in enumerate(containers):
            container.reload()
            addresses.append(container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])
            client = docker.DockerClient(base_url=f"unix://{sockets / f'node{index}' / 'docker.sock'}", timeout=600)
            deadline = time.monotonic() + 60
            while True:  # the inner engine takes a few seconds to answer
                try:
                    client.ping()
                    break
                except docker.errors.DockerException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            clients.append(client)
        # Every node gets the core image from the host's engine (no registry to pull from).
        loads = [
            subprocess.Popen(
                f"docker save {core_image} | docker -H unix://{sockets / f'node{index}' / 'docker.sock'} load -q",
                shell=True, stdout=subprocess.DEVNULL,
            )
            for index in range(NODES)
        ]  # fmt: skip
        assert [load.wait() for load in loads] == [0] * NODES
        manager = clients[0]
        manager.swarm.init(advertise_addr=addresses[0], listen_addr=f"{addresses[0]}:2377")
        token = manager.swarm.attrs["JoinTokens"]["Worker"]
        for client, address in zip(clients[1:], addresses[1:], strict=True):
            client.swarm.join(remote_addrs=[f"{addresses[0]}:2377"], join_token=token, advertise_addr=address)
        yield Swarm(manager, sockets / "node0" / "docker.sock", containers, addresses)
    finally:
        for container in containers:
            container.remove(force=True, v=True)
        network.remove()


@pytest.fixture
async def on_nodes(
    orchestrator_config: OrchestratorConfig, core_image: str, three_nodes: Swarm, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[OrchestratorUnderTest]:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{three_nodes.manager_socket}")
    config = dataclasses.replace(orchestrator_config, runtime="swarm", image=core_image)
    running = await start_orchestrator(config)
    try:
        yield running
    finally:
        await running.close()


def node_of(manager: docker.DockerClient, session_id: str) -> str:
    """The hostname of the node whose task runs the session now."""
    [service] = manager.api.services(filters={"label": f"{SESSION_LABEL}={session_id}"})
    [task] = [t for t in manager.api.tasks(filters={"service": service["ID"]}) if t["Status"]["State"] == "running"]
    return manager.api.inspect_node(task["NodeID"])["Description"]["Hostname"]


async def test_sessions_spread_over_the_nodes_and_a_dead_workers_come_back_from_their_last_save(
    on_nodes: OrchestratorUnderTest, three_nodes: Swarm
) -> None:
    stub, manager = on_nodes.stub, three_nodes.manager
    started = time.monotonic()
    sessions = await asyncio.gather(*(create_ready(on_nodes, template="node-basic") for _ in range(NODES)))
    created_s = time.monotonic() - started
    placed = {session.id: node_of(manager, session.id) for session in sessions}
    print(f"\n{NODES} sessions READY in {created_s:.1f} s on nodes {sorted(placed.values())}")
    assert sorted(placed.values()) == [f"node{index}" for index in range(NODES)], "one session per node"

    for session in sessions:
        await shell_output(session, f"echo {session.id} > /app/mine.txt")
    saves = {s.id: (await stub.SaveSession(pb.SaveSessionRequest(id=s.id))).archive for s in sessions}

    victim = next(session for session in sessions if placed[session.id] == "node2")
    three_nodes.containers[2].kill()
    killed = time.monotonic()
    async with asyncio.timeout(180):  # bounds a hang only
        while True:
            back = (await stub.GetSession(pb.GetSessionRequest(id=victim.id))).session
            again = [p for p in back.phases if p.phase == pb.PHASE_CONTAINER_STARTED][1:]
            if again and back.state == READY:
                break
            await asyncio.sleep(0.5)
    recovered_s = time.monotonic() - killed
    print(f"node2 killed: session {victim.id} READY again on {node_of(manager, victim.id)} after {recovered_s:.1f} s")
    print(f"its container phase: {again[-1].detail}")
    assert "node2" in again[-1].detail and "is down" in again[-1].detail
    assert saves[victim.id].id in again[-1].detail and back.archive_id == saves[victim.id].id
    assert node_of(manager, victim.id) != "node2"
    assert (await shell_output(back, "cat /app/mine.txt")).strip() == victim.id
    # The others were not touched.
    for session in sessions:
        if session.id != victim.id:
            other = (await stub.GetSession(pb.GetSessionRequest(id=session.id))).session
            assert other.state == READY and len(other.phases) == len(session.phases)
