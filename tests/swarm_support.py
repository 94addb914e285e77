"""Swarm in the tests: the engine in swarm mode for the session (a single-node swarm on loopback, left again only
if the tests made it), and removal of what a test's orchestrator instance created on it."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from orchestrator.runtime.base import ORCHESTRATOR_LABEL


@pytest.fixture(scope="session")
def swarm(docker_client: docker.DockerClient) -> Iterator[docker.DockerClient]:
    """The engine as a swarm manager: `docker swarm init --advertise-addr 127.0.0.1` when it is in no swarm
    (its control port on loopback only), `docker swarm leave --force` at the end only in that case."""
    state = docker_client.info()["Swarm"]["LocalNodeState"]
    initialized = False
    if state == "inactive":
        docker_client.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
        initialized = True
    elif state != "active" or not docker_client.info()["Swarm"].get("ControlAvailable"):
        pytest.fail(f"the engine is in swarm state {state!r}, not a manager: the swarm tests need one", pytrace=False)
    yield docker_client
    if initialized:
        docker_client.swarm.leave(force=True)


def remove_instance(client: docker.DockerClient, instance_id: str) -> None:
    """Removes every service, secret, config and network carrying the orchestrator label `instance_id`."""
    selector = {"label": f"{ORCHESTRATOR_LABEL}={instance_id}"}
    for service in client.services.list(filters=selector):
        service.remove()
    for secret in client.secrets.list(filters=selector):
        secret.remove()
    for network in client.networks.list(filters=selector):
        network.remove()
