"""What the orchestrator needs from a place that runs workspaces: the Runtime protocol, the Workspace it
reports, the labels that mark our workspaces, the agent's tracing environment, and the trust settings for an
extra CA bundle."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import certifi
from opentelemetry.sdk.environment_variables import OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME

from common.durable import write_atomically
from common.telemetry import SESSION_ATTRIBUTE, tracing_requested
from orchestrator.errors import InvalidArgument

if TYPE_CHECKING:
    from orchestrator.templates import ResourceHints

# Every workspace carries these labels (the Docker label convention of reverse-DNS-ish keys).
SESSION_LABEL = "workspace-core.session"
ORCHESTRATOR_LABEL = "workspace-core.orchestrator"
MANAGED_LABEL = "workspace-core.managed"
# Pool members (started ahead of any session) carry this instead of SESSION_LABEL, with the pool's kind
# ("warm"); labels cannot change after creation, so a claimed member's session is in its name (see claim()).
POOL_LABEL = "workspace-core.pool"
# A hot pool entry's template, and what it was made from: `<template content hash>:<image id>` (both short).
POOL_TEMPLATE_LABEL = "workspace-core.pool.template"
POOL_KEY_LABEL = "workspace-core.pool.key"

# The OpenTelemetry service name of every workspace's agent.
AGENT_SERVICE_NAME = "workspace-agent"

# Session ids end up in container names and directory names.
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def workspace_agent_env(session_id: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The `OTEL_*` variables for a workspace's agent: this process's (same exporter, endpoint, sampler), under
    the agent's own service name and with the session id as a resource attribute; {} while tracing is off."""
    if not tracing_requested(environ):
        return {}
    env = {key: value for key, value in environ.items() if key.startswith("OTEL_")}
    env[OTEL_SERVICE_NAME] = AGENT_SERVICE_NAME
    env[OTEL_RESOURCE_ATTRIBUTES] = ",".join(
        filter(None, (env.get(OTEL_RESOURCE_ATTRIBUTES, ""), f"{SESSION_ATTRIBUTE}={session_id}"))
    )
    return env


@dataclass
class Workspace:
    """A running (or stopped, not yet removed) workspace as its runtime sees it."""

    session_id: str
    runtime: str  # "docker" | "local"
    handle: str  # container id, or the agent's pid
    agent_endpoint: str  # "127.0.0.1:PORT"
    preview_port: int
    preview_url: str  # "http://127.0.0.1:PORT/"
    image: str
    running: bool
    labels: dict[str, str] = field(default_factory=dict)
    # An unclaimed pool member's id (its session_id is ""); "" for a session's workspace, claimed ones included.
    pool_id: str = ""
    # The limits it runs with, when its runtime enforces and reports them (a claim applies only what differs).
    resources: ResourceHints | None = None


@dataclass(frozen=True)
class WorkspaceExit:
    """A workspace that stopped running without being stopped through its runtime: `reason` says what
    happened, for a person ("the container was OOM-killed ...", "... exited with code 1")."""

    session_id: str
    handle: str
    reason: str
    # The workspace can be made again elsewhere and its session come back from its last save (Swarm: a task that
    # ended or whose node went down, taking its volumes), rather than the session failing.
    recoverable: bool = False


class Runtime(Protocol):
    """Starts, lists and removes workspaces. Implementations: DockerRuntime, LocalRuntime."""

    name: str
    # Whether the workspace can still read the token it was started with, however the agent treats it (a Swarm
    # secret stays mounted): then a session's own token reaches the agent only through Claim (see
    # Initialization.start_container), and what the workspace can read is refused from then on.
    token_stays_readable: bool

    async def start(
        self, session_id: str, token: str, *, resources: ResourceHints, env: dict[str, str], labels: dict[str, str]
    ) -> Workspace:
        """Creates and starts a workspace; does not wait for the agent to be healthy.
        Raises EngineUnavailable, ImageMissing, InvalidArgument (bad session id)."""
        ...

    async def stop(self, session_id: str) -> None:
        """Removes the workspace and everything running in it; stopping an unknown one is not an error."""
        ...

    async def pause(self, session_id: str) -> None:
        """Stops everything running in the session's workspace and keeps its files (the container stopped, not
        removed; the local runtime's directory), for resume(). Its agent's exit is not reported by exits().
        Raises WorkspaceMissing (no workspace of that session), EngineUnavailable, FailedPrecondition."""
        ...

    async def resume(self, session_id: str, token: str, *, env: dict[str, str]) -> Workspace:
        """Starts a paused workspace again with the files it had, its agent given `token` the way start() gives
        it (the agent removed the token file when it first read it); `env` is the template's, for a runtime
        that sets the agent's environment at each start. Its ports may differ from before the pause. Does not
        wait for the agent. Raises WorkspaceMissing (it was removed meanwhile), EngineUnavailable,
        FailedPrecondition."""
        ...

    async def start_pooled(
        self,
        pool_id: str,
        credential: str,
        *,
        kind: str = "warm",
        labels: dict[str, str] | None = None,
        resources: ResourceHints | None = None,
    ) -> Workspace:
        """Creates and starts a pool member: a workspace of no session, with `resources` (the defaults when None; a
        claim applies the session's), its agent
        holding `credential` (delivered like a session's token) and `labels` besides ours; does not wait for
        the agent. Raises EngineUnavailable, ImageMissing, InvalidArgument (bad pool id)."""
        ...

    async def image_id(self) -> str:
        """The id of the image a workspace started now runs (it changes when the core image is rebuilt).
        Raises EngineUnavailable, ImageMissing."""
        ...

    async def claim(self, workspace: Workspace, session_id: str, *, resources: ResourceHints) -> Workspace:
        """Makes the pool member `workspace` the session's workspace, atomically (two claims of one member, from
        this orchestrator or another, cannot both succeed), with `resources` applied; from then on list(),
        exits() and stop(session_id) know it as the session's. Does not talk to its agent (AgentClient.claim).
        Raises FailedPrecondition (claimed already, gone, or the limits could not be applied: then it is the
        session's workspace already, for stop(session_id) to remove), EngineUnavailable, InvalidArgument."""
        ...

    async def discard(self, pool_id: str) -> None:
        """Removes an unclaimed pool member; an unknown one is not an error. Raises EngineUnavailable."""
        ...

    async def list(self) -> list[Workspace]:
        """Every workspace of this orchestrator instance, running or not, unclaimed pool members included."""
        ...

    def exits(self) -> AsyncIterator[WorkspaceExit]:
        """This instance's workspaces that stop running other than through stop() (they exit, are killed or
        are removed behind the runtime's back), as they do, from the moment exits() is called until the
        iterator is closed. A workspace may be reported more than once; one stopped through stop() is not."""
        ...

    async def close(self) -> None:
        """Releases the runtime's resources; workspaces keep running (a later orchestrator adopts them)."""
        ...


def check_session_id(session_id: str) -> str:
    """Returns `session_id` if it is safe as a container and directory name; raises InvalidArgument otherwise."""
    if not _SESSION_ID.fullmatch(session_id):
        raise InvalidArgument(
            f"session id {session_id!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return session_id


def workspace_labels(instance_id: str, session_id: str, extra: dict[str, str]) -> dict[str, str]:
    """The caller's labels plus ours; ours win, so a caller cannot make a workspace look like another's."""
    return {**extra, MANAGED_LABEL: "true", ORCHESTRATOR_LABEL: instance_id, SESSION_LABEL: session_id}


def pool_labels(instance_id: str, kind: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The labels of a pool member: `extra`, ours, and the pool's kind instead of a session."""
    return {**(extra or {}), MANAGED_LABEL: "true", ORCHESTRATOR_LABEL: instance_id, POOL_LABEL: kind}


def trust_env(bundle: str) -> dict[str, str]:
    """Environment that makes node, npm, pip, git, curl and OpenSSL-based tools trust the PEM bundle at `bundle`
    (a path as the workspace sees it). The bundle holds the public roots too: most of these replace the default
    roots rather than adding to them."""
    return {
        "NODE_EXTRA_CA_CERTS": bundle,
        "npm_config_cafile": bundle,
        "PIP_CERT": bundle,
        "SSL_CERT_FILE": bundle,
        "REQUESTS_CA_BUNDLE": bundle,
        "CURL_CA_BUNDLE": bundle,
        "GIT_SSL_CAINFO": bundle,
    }


def write_trust_bundle(extra_ca: Path, directory: Path) -> Path:
    """Writes the public roots (certifi's Mozilla bundle) followed by the certificates in `extra_ca` (e.g. a
    TLS-intercepting proxy's CA) to `directory/ca-bundle.pem`, atomically, and returns its path.
    Raises InvalidArgument when `extra_ca` is not a readable PEM file."""
    try:
        extra = extra_ca.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"extra CA bundle {extra_ca}: cannot read it: {error}") from error
    if "-----BEGIN CERTIFICATE-----" not in extra:
        raise InvalidArgument(f"extra CA bundle {extra_ca}: no PEM certificate in it")
    directory.mkdir(parents=True, exist_ok=True)
    bundle = directory / "ca-bundle.pem"
    # Readable by the workspace user (uid 1000 in the container), which does not own the file.
    write_atomically(
        bundle, Path(certifi.where()).read_text() + f"\n# Extra CA bundle from {extra_ca}\n{extra}", mode=0o644
    )
    return bundle
