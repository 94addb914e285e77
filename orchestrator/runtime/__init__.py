"""Where workspaces run: containers from the core image (docker), Swarm services of it (swarm) or agent
subprocesses (local)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.errors import InvalidArgument
from orchestrator.runtime.base import Runtime, Workspace, write_trust_bundle

if TYPE_CHECKING:
    from orchestrator.config import OrchestratorConfig

__all__ = ["Runtime", "Workspace", "make_runtime"]


def make_runtime(kind: str, config: OrchestratorConfig) -> Runtime:
    """The runtime named `kind` ("docker", "swarm" or "local") set up from `config`. Creating it touches no engine:
    an unreachable Docker engine is reported by the first call. Raises InvalidArgument for an unknown kind
    or an unreadable extra CA bundle."""
    trust_bundle = None
    if config.extra_ca_bundle is not None:
        trust_bundle = write_trust_bundle(config.extra_ca_bundle, config.data_dir / "trust")
    if kind == "docker":
        # Imported on use: the Docker SDK (and requests) load only for the runtime that needs them.
        from orchestrator.runtime.docker import DockerRuntime

        return DockerRuntime(
            image=config.image,
            instance_id=config.resolved_instance_id(),
            host_address=config.host_address,
            trust_bundle=trust_bundle,
        )
    if kind == "swarm":
        from orchestrator.runtime.swarm import SwarmRuntime

        return SwarmRuntime(
            image=config.image,
            instance_id=config.resolved_instance_id(),
            host_address=config.host_address,
            trust_bundle=trust_bundle,
            network=config.swarm_network,
            agent_address=config.swarm_agent_address,
        )
    if kind == "local":
        from orchestrator.runtime.local import LocalRuntime

        return LocalRuntime(
            directory=config.workspaces_dir,
            instance_id=config.resolved_instance_id(),
            host_address=config.host_address,
            trust_bundle=trust_bundle,
        )
    raise InvalidArgument(f"unknown runtime {kind!r}: use docker, swarm or local")
